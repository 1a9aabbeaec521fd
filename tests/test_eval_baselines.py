"""Baselines against independent computations (loops, Counter-based n-gram models, POT)."""

from __future__ import annotations

import hashlib
import math
from collections import Counter

import numpy as np
import pytest

from sotjax.eval import baselines as B
from sotjax.eval import metrics as M


def test_wordpunct_and_hashed_counts_by_hand():
    assert B.wordpunct_tokenize("Hello, world!! it's") == ["Hello", ",", "world", "!!", "it", "'", "s"]
    c = B.hashed_ngram_counts("A b a", num_buckets=97)
    expected = np.zeros(97, dtype=np.int64)
    for g in ["a", "b", "a", "a b", "b a"]:
        expected[int(hashlib.sha256(g.encode()).hexdigest(), 16) % 97] += 1
    np.testing.assert_array_equal(c, expected)
    assert c.sum() == 5


def _dsir_reference(corpus, target):
    """DSIR without hashing (exact n-gram strings), float64, Counter-based."""
    def grams(t):
        w = B.wordpunct_tokenize(t.lower())
        return w + [f"{a} {b}" for a, b in zip(w, w[1:], strict=False)]

    raw = Counter(g for t in corpus for g in grams(t))
    tgt = Counter(g for t in target for g in grams(t))
    nr, nt = sum(raw.values()), sum(tgt.values())
    out = []
    for t in corpus:
        s = 0.0
        for g in grams(t):
            s += math.log(tgt[g] / nt + 1e-8) - math.log(raw[g] / nr + 1e-8)
        out.append(s)
    return np.array(out)


def test_dsir_matches_unhashed_reference():
    corpus = [
        "how do I reset my password?",
        "what is the capital of france",
        "tell me a joke about computers",
        "reset the router and try again",
        "the capital of france is paris",
    ]
    target = ["how do I reset my router password", "try to reset it again"]
    # a huge bucket count makes collisions (almost surely) absent, so hashing = exact n-grams
    got = B.dsir_scores(corpus, target, num_buckets=2**40)
    np.testing.assert_allclose(got, _dsir_reference(corpus, target), rtol=1e-9, atol=1e-9)
    # behaviour: the texts about resetting score above the others
    assert min(got[0], got[3]) > max(got[1], got[2], got[4])


def test_length_scores():
    np.testing.assert_array_equal(B.length_scores(["ab", "", "abcd"]), [-2.0, 0.0, -4.0])


def test_bidirectional_anchor_matches_loops():
    rng = np.random.default_rng(0)
    z, s, h = rng.normal(size=(12, 5)), rng.normal(size=(4, 5)), rng.normal(size=(6, 5))

    def cos(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    ref = [-(np.mean([cos(zi, hj) for hj in h]) - np.mean([cos(zi, sk) for sk in s])) for zi in z]
    np.testing.assert_allclose(B.bidirectional_anchor_scores(z, s, h), ref, rtol=1e-10, atol=1e-12)


def test_knn_harmful_matches_sorting():
    rng = np.random.default_rng(1)
    z, h = rng.normal(size=(30, 4)), rng.normal(size=(9, 4))
    for k in (1, 3, 9, 20):
        ref = []
        for zi in z:
            d = sorted(1 - zi @ hj / (np.linalg.norm(zi) * np.linalg.norm(hj)) for hj in h)
            ref.append(np.mean(d[: min(k, len(h))]))
        np.testing.assert_allclose(B.knn_harmful_scores(z, h, k=k, block=7), ref, rtol=1e-10, atol=1e-12)


def _pot_potential(corpus, safe, eps):
    ot = pytest.importorskip("ot")
    zu = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    su = safe / np.linalg.norm(safe, axis=1, keepdims=True)
    cost = 1.0 - zu @ su.T
    a = np.full(len(zu), 1.0 / len(zu))
    b = np.full(len(su), 1.0 / len(su))
    _, log = ot.bregman.sinkhorn_log(a, b, cost, eps, numItermax=20000, stopThr=1e-12, log=True)
    f = np.asarray(log["log_u"]) * eps
    return f - f.mean()


def test_gotd_matches_pot_potential():
    rng = np.random.default_rng(2)
    corpus = rng.normal(size=(40, 6))
    safe = rng.normal(size=(8, 6)) + 0.5
    got = B.gotd_scores(corpus, safe, epsilon=0.1, threshold=1e-7)
    ref = -_pot_potential(corpus, safe, 0.1)
    np.testing.assert_allclose(got, ref, atol=2e-4)


def _clusters(seed=3, n=300, d=16):
    rng = np.random.default_rng(seed)
    task, harm = rng.normal(size=d), rng.normal(size=d)
    y = np.zeros(n, dtype=bool)
    y[: n // 10] = True
    corpus = np.where(y[:, None], harm, task) + 0.6 * rng.normal(size=(n, d))
    safe = task + 0.6 * rng.normal(size=(20, d))
    harmful = harm + 0.6 * rng.normal(size=(50, d))
    return corpus, safe, harmful, y


def test_embedding_baselines_separate_clusters():
    corpus, safe, harmful, y = _clusters()
    scores = B.run_baselines(corpus, safe, harmful, seed=0)
    assert set(scores) == {"random", "bidirectional_anchor", "knn_harmful", "gotd"}
    for name in ("bidirectional_anchor", "knn_harmful", "gotd"):
        assert M.auroc(scores[name], y) > 0.99, name
    assert 0.3 < M.auroc(scores["random"], y) < 0.7
    np.testing.assert_array_equal(scores["random"], B.random_scores(len(y), 0))
