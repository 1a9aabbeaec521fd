"""Metrics against hand-computed cases and brute-force independent computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from sotjax.eval import metrics as M

# ----------------------------------------------------------------- independent references

def auroc_bruteforce(scores, harmful):
    """P(s_b > s_h) + ½ P(s_b = s_h) by enumerating every (benign, harmful) pair."""
    b = [s for s, h in zip(scores, harmful, strict=True) if not h]
    hs = [s for s, h in zip(scores, harmful, strict=True) if h]
    total = 0.0
    for x in b:
        for y in hs:
            total += 1.0 if x > y else (0.5 if x == y else 0.0)
    return total / (len(b) * len(hs))


def ap_bruteforce(scores, positive):
    """AP from the definition: one threshold per distinct score, descending."""
    n_pos = sum(positive)
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        sel = [p for s, p in zip(scores, positive, strict=True) if s >= t]
        tp = sum(sel)
        precision, recall = tp / len(sel), tp / n_pos
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


def retention_by_enumeration(scores, harmful, k):
    """Average over every tie-breaking order (all permutations of the score order)."""
    n = len(scores)
    kept_h, count = 0.0, 0
    for perm in itertools.permutations(range(n)):
        # a strict order consistent with the scores: sort by (-score, position in perm)
        pos = {i: j for j, i in enumerate(perm)}
        order = sorted(range(n), key=lambda i: (-scores[i], pos[i]))
        top = set(order[:k])
        kept_h += sum(1 for i in top if harmful[i]) / sum(harmful)
        count += 1
    return kept_h / count


# ----------------------------------------------------------------- hand-computed cases

def test_auroc_hand_cases():
    # benign 3, 2 ; harmful 1  -> both pairs benign > harmful
    assert M.auroc([3, 2, 1], [False, False, True]) == 1.0
    # reversed
    assert M.auroc([1, 2, 3], [False, False, True]) == 0.0
    # benign {2, 1}, harmful {2}: pairs (2,2)=½, (1,2)=0 -> 0.25
    assert M.auroc([2, 1, 2], [False, False, True]) == pytest.approx(0.25)
    # all equal -> ½
    assert M.auroc([5, 5, 5, 5], [True, False, True, False]) == pytest.approx(0.5)
    assert math.isnan(M.auroc([1, 2], [False, False]))


def test_average_precision_hand_cases():
    # positives ranked 1st and 3rd: AP = ½·1 + ½·(2/3)
    assert M.average_precision([0.9, 0.8, 0.7], [True, False, True]) == pytest.approx(0.5 + 1 / 3)
    # a tie between a positive and a negative at the top: one threshold, precision ½, recall 1
    assert M.average_precision([1.0, 1.0], [True, False]) == pytest.approx(0.5)
    # perfect ranking
    assert M.average_precision([3, 2, 1, 0], [True, True, False, False]) == pytest.approx(1.0)
    # AUPRC for harmful uses low keep-scores: harmful at the lowest score -> 1
    assert M.auprc_harmful([0.9, 0.8, 0.1], [False, False, True]) == pytest.approx(1.0)


def test_topk_inclusion_hand_cases():
    # scores 3, 2, 2, 2, 1 and K = 2: one slot left for three tied rows
    p = M.topk_inclusion(np.array([3, 2, 2, 2, 1.0]), 2)
    np.testing.assert_allclose(p, [1, 1 / 3, 1 / 3, 1 / 3, 0])
    assert p.sum() == pytest.approx(2)
    # constant scores keep exactly keep·n of each class in expectation
    y = np.array([True] * 3 + [False] * 7)
    assert M.harmful_retention(np.zeros(10), y, 8) == pytest.approx(0.8)
    assert M.benign_recall(np.zeros(10), y, 8) == pytest.approx(0.8)


def test_retention_and_recall_hand_case():
    s = np.array([0.9, 0.1, 0.8, 0.2, 0.7])
    y = np.array([False, True, False, True, False])
    # K = 4 keeps 0.9, 0.8, 0.7, 0.2 -> one of two harmful kept, all benign kept
    assert M.harmful_retention(s, y, 4) == pytest.approx(0.5)
    assert M.benign_recall(s, y, 4) == pytest.approx(1.0)
    assert M.harmful_weight_mass(np.array([0.4, 0.1, 0.3, 0.1, 0.1]), y) == pytest.approx(0.2)


def test_resolve_k():
    assert M.resolve_k(10, keep=0.8) == 8
    assert M.resolve_k(5, keep=0.5) == 3  # round half up
    assert M.resolve_k(10, keep_count=3) == 3
    assert M.resolve_k(3, keep=0.01) == 1
    with pytest.raises(ValueError):
        M.resolve_k(10, keep=0.8, keep_count=2)
    with pytest.raises(ValueError):
        M.resolve_k(10, keep_count=11)
    with pytest.raises(ValueError):
        M.resolve_k(10, keep=0.0)


# ----------------------------------------------------------------- randomised vs brute force

@pytest.mark.parametrize("seed", range(6))
def test_auroc_ap_match_bruteforce_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 40
    s = rng.integers(0, 6, size=n).astype(float)  # many ties
    y = rng.random(n) < 0.3
    y[0], y[1] = True, False
    assert M.auroc(s, y) == pytest.approx(auroc_bruteforce(list(s), list(y)), abs=1e-12)
    assert M.average_precision(s, y) == pytest.approx(ap_bruteforce(list(s), list(y)), abs=1e-12)
    assert M.auprc_harmful(s, y) == pytest.approx(ap_bruteforce(list(-s), list(y)), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_retention_matches_permutation_enumeration(seed):
    rng = np.random.default_rng(100 + seed)
    n = 7
    s = rng.integers(0, 3, size=n).astype(float)
    y = rng.random(n) < 0.5
    y[0] = True
    for k in (1, 3, 5):
        assert M.harmful_retention(s, y, k) == pytest.approx(retention_by_enumeration(list(s), list(y), k), abs=1e-12)


def test_auroc_invariant_to_monotone_transform_and_flips_with_sign():
    rng = np.random.default_rng(7)
    s = rng.normal(size=200)
    y = rng.random(200) < 0.2
    a = M.auroc(s, y)
    assert M.auroc(np.exp(3 * s), y) == pytest.approx(a)
    assert M.auroc(-s, y) == pytest.approx(1 - a)


def test_evaluate_scores_and_mean_std():
    s = np.array([0.9, 0.1, 0.8, 0.2, 0.7])
    y = np.array([False, True, False, True, False])
    out = M.evaluate_scores(s, y, keep=0.8, weights=s / s.sum())
    assert out["auroc"] == 1.0 and out["auprc"] == pytest.approx(1.0)
    assert out["k"] == 4 and out["harmful_retention"] == pytest.approx(0.5)
    assert out["harmful_weight_mass"] == pytest.approx(0.3 / 2.7)
    ms = M.mean_std([{"a": 1.0}, {"a": 3.0}, {"a": float("nan")}])
    assert ms["a"] == pytest.approx((2.0, math.sqrt(2.0)))


def test_bad_inputs():
    with pytest.raises(ValueError):
        M.auroc([1.0, np.nan], [True, False])
    with pytest.raises(ValueError):
        M.auroc([1.0, 2.0, 3.0], [True, False])
    with pytest.raises(ValueError):
        M.harmful_weight_mass(np.array([-0.1, 1.1]), np.array([True, False]))
