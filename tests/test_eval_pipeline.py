"""Pipeline helpers: feature standardisation and the model-free n-gram sketch."""

from __future__ import annotations

import numpy as np

from sotjax.eval import pipeline as P


def test_standardize_uses_corpus_statistics():
    rng = np.random.default_rng(0)
    emb = {
        "corpus": rng.normal(size=(200, 4)) * [1.0, 10.0, 0.1, 5.0] + [0.0, 50.0, -3.0, 1.0],
        "safe": rng.normal(size=(7, 4)),
        "harmful": rng.normal(size=(9, 4)),
    }
    out = P.standardize(emb)
    np.testing.assert_allclose(out["corpus"].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out["corpus"].std(axis=0), 1.0, rtol=1e-4)
    mu, sd = emb["corpus"].mean(axis=0), emb["corpus"].std(axis=0) + 1e-6
    np.testing.assert_allclose(out["safe"], (emb["safe"] - mu) / sd, rtol=1e-5, atol=1e-5)
    assert out["harmful"].dtype == np.float32


def test_hashed_ngram_features():
    texts = ["how do I reset my password", "How do I reset my PASSWORD?", "the capital of france is paris", ""]
    z = P.hashed_ngram_features(texts, dim=128)
    assert z.shape == (4, 128) and z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(z, P.hashed_ngram_features(texts, dim=128))  # deterministic
    cos = z @ z.T
    assert cos[0, 1] > 0.8 and abs(cos[0, 2]) < cos[0, 1]
