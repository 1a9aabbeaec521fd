"""Pipeline helpers: feature conditioning of the evaluation and the model-free n-gram sketch."""

from __future__ import annotations

import numpy as np

from sotjax.eval import pipeline as P


def _sets(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "corpus": rng.normal(size=(200, 4)) * [1.0, 10.0, 0.1, 5.0] + [0.0, 50.0, -3.0, 1.0],
        "safe": rng.normal(size=(7, 4)) + 2.0,
        "harmful": rng.normal(size=(9, 4)) * 3.0,
    }


def test_condition_standardize_weighs_each_set_equally():
    emb = _sets()
    out, fitted = P.condition(emb, "standardize")
    # independent float64 reference: the pooled mean/variance with weight 1/3 per set
    mu = np.mean([emb[k].mean(axis=0) for k in ("corpus", "safe", "harmful")], axis=0)
    var = np.mean([((emb[k] - mu) ** 2).mean(axis=0) for k in ("corpus", "safe", "harmful")], axis=0)
    for k in emb:
        np.testing.assert_allclose(out[k], (emb[k] - mu) / np.sqrt(var), rtol=1e-5, atol=1e-5)
        assert out[k].dtype == np.float32
    assert fitted is not None and fitted.config.spec == "standardize"


def test_condition_raw_is_the_identity():
    emb = _sets()
    out, fitted = P.condition(emb, "raw")
    assert fitted is None and all(out[k] is emb[k] for k in emb)


def test_fit_with_conditioning_equals_fit_on_conditioned_features():
    import sotjax

    emb = _sets(1)
    cfg = sotjax.SOTConfig(conditioning="raw", steps=5, dtype="float64")
    direct = sotjax.fit(emb["corpus"], emb["safe"], emb["harmful"], cfg.replace(conditioning="abtt:1"))
    out, _ = P.condition(emb, "abtt:1")
    via = sotjax.fit(out["corpus"], out["safe"], out["harmful"], cfg)
    assert direct.conditioner is not None and via.conditioner is None
    np.testing.assert_allclose(direct.logits, via.logits, rtol=1e-5, atol=1e-6)



def test_hashed_ngram_features():
    texts = ["how do I reset my password", "How do I reset my PASSWORD?", "the capital of france is paris", ""]
    z = P.hashed_ngram_features(texts, dim=128)
    assert z.shape == (4, 128) and z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(z, P.hashed_ngram_features(texts, dim=128))  # deterministic
    cos = z @ z.T
    assert cos[0, 1] > 0.8 and abs(cos[0, 2]) < cos[0, 1]
