"""Selection-quality metrics with known contamination labels (plain NumPy, tie-aware).

Conventions. ``scores`` are "keep" scores: higher = more likely to be kept (SOT weights,
or any baseline's score). ``is_harmful`` is a boolean mask of the injected harmful rows.

* **AUROC** of the scores for benign vs harmful:
  ``P(s_benign > s_harmful) + ½·P(s_benign = s_harmful)`` (Mann–Whitney U / (n_b·n_h),
  computed from mid-ranks, so tied scores count one half).
* **AUPRC** (average precision) for *detecting harmful rows* with ``−scores``: harmful is the
  minority class, so this is the informative direction (benign-positive AP is ≈ 1 − p for any
  scorer). Tied scores form one threshold (sklearn's convention):
  ``AP = Σ_t (R_t − R_{t−1}) · P_t`` over distinct thresholds t, descending.
* **Top-K** (``K = round(keep · n)`` or given): rows are kept by descending score. A group of
  tied scores that straddles the cut is split at random; metrics use the *expected* value
  under uniformly random tie-breaking, i.e. each row of the straddling group is kept with
  probability (free slots) / (group size). A constant score keeps exactly ``keep`` of each class.
* **Harmful retention** = E[#harmful kept] / #harmful; **benign recall** = E[#benign kept] / #benign.
* **Harmful weight mass** = Σ_{harmful} w_i / Σ_i w_i for non-negative weights (SOT's simplex
  weights; not defined for arbitrary baseline scores).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def _as_scores(scores: np.ndarray, is_harmful: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(is_harmful).reshape(-1)
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("is_harmful must be boolean or 0/1")
        y = y.astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and is_harmful {y.shape} differ in length")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    return s, y


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` ascending, tied values sharing the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # boundaries of runs of equal values
    starts = np.r_[0, np.flatnonzero(np.diff(xs)) + 1]
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks_sorted = np.repeat(avg, ends - starts)
    out = np.empty_like(ranks_sorted)
    out[order] = ranks_sorted
    return out


def auroc(scores: np.ndarray, is_harmful: np.ndarray) -> float:
    """AUROC of keep-scores separating benign (positive) from harmful rows; ties count ½.

    ``U = Σ_{benign} rank_i − n_b(n_b+1)/2`` with mid-ranks, AUROC = U / (n_b·n_h).
    NaN when one class is empty.
    """
    s, y = _as_scores(scores, is_harmful)
    n_h = int(y.sum())
    n_b = y.size - n_h
    if n_h == 0 or n_b == 0:
        return float("nan")
    r = midranks(s)
    u = r[~y].sum() - n_b * (n_b + 1) / 2.0
    return float(u / (n_b * n_h))


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Average precision of ``scores`` for retrieving ``positive`` rows (ties = one threshold).

    ``AP = Σ_t (R_t − R_{t−1}) · P_t`` with thresholds t the distinct score values in
    descending order, ``P_t``/``R_t`` precision/recall of {score ≥ t}. NaN without positives.
    """
    s, y = _as_scores(scores, positive)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s_sorted)), s.size - 1]
    tp = np.cumsum(y_sorted)[last_of_group].astype(np.float64)
    k = (last_of_group + 1).astype(np.float64)
    precision = tp / k
    recall = tp / n_pos
    d_recall = np.diff(np.r_[0.0, recall])
    return float(np.sum(d_recall * precision))


def auprc_harmful(scores: np.ndarray, is_harmful: np.ndarray) -> float:
    """AUPRC for flagging harmful rows by low keep-score: ``average_precision(−scores, harmful)``."""
    s, y = _as_scores(scores, is_harmful)
    return average_precision(-s, y)


def resolve_k(n: int, keep: float | None = None, keep_count: int | None = None) -> int:
    """K from a fraction (``round(keep·n)``, half up, at least 1) or a count; exactly one given."""
    if (keep is None) == (keep_count is None):
        raise ValueError("give exactly one of keep and keep_count")
    if keep_count is not None:
        k = int(keep_count)
    else:
        if keep is None:  # unreachable: exactly one of keep / keep_count is set (checked above)
            raise ValueError("give exactly one of keep and keep_count")
        if not 0.0 < float(keep) <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        k = max(1, int(math.floor(float(keep) * n + 0.5)))
    if not 1 <= k <= n:
        raise ValueError(f"K must be in [1, {n}], got {k}")
    return k


def topk_inclusion(scores: np.ndarray, k: int) -> np.ndarray:
    """Probability that each row is in the Top-K under uniformly random tie-breaking.

    Rows scoring above the K-th largest value t get 1, rows below get 0, and the m rows equal
    to t share the remaining ``K − #{s > t}`` slots: each gets ``(K − #{s > t}) / m``.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = s.size
    if not 1 <= k <= n:
        raise ValueError(f"K must be in [1, {n}], got {k}")
    t = np.sort(s)[::-1][k - 1]
    above = s > t
    tied = s == t
    out = above.astype(np.float64)
    out[tied] = (k - int(above.sum())) / int(tied.sum())
    return out


def harmful_retention(scores: np.ndarray, is_harmful: np.ndarray, k: int) -> float:
    """Expected fraction of harmful rows inside the Top-K (NaN if there are none)."""
    s, y = _as_scores(scores, is_harmful)
    if not y.any():
        return float("nan")
    return float(topk_inclusion(s, k)[y].mean())


def benign_recall(scores: np.ndarray, is_harmful: np.ndarray, k: int) -> float:
    """Expected fraction of benign rows inside the Top-K (NaN if there are none)."""
    s, y = _as_scores(scores, is_harmful)
    if y.all():
        return float("nan")
    return float(topk_inclusion(s, k)[~y].mean())


def harmful_weight_mass(weights: np.ndarray, is_harmful: np.ndarray) -> float:
    """Share of the total weight on harmful rows, ``Σ_harm w / Σ w`` (weights must be ≥ 0)."""
    w, y = _as_scores(weights, is_harmful)
    if (w < 0).any():
        raise ValueError("weights must be non-negative")
    total = w.sum()
    if total <= 0:
        raise ValueError("weights sum to zero")
    return float(w[y].sum() / total)


def evaluate_scores(
    scores: np.ndarray,
    is_harmful: np.ndarray,
    keep: float | None = 0.8,
    keep_count: int | None = None,
    weights: np.ndarray | None = None,
) -> dict[str, float]:
    """All metrics for one score vector; ``weights`` (simplex) adds the harmful weight mass."""
    s, y = _as_scores(scores, is_harmful)
    k = resolve_k(s.size, None if keep_count is not None else keep, keep_count)
    out = {
        "auroc": auroc(s, y),
        "auprc": auprc_harmful(s, y),
        "harmful_retention": harmful_retention(s, y, k),
        "benign_recall": benign_recall(s, y, k),
        "k": float(k),
    }
    if weights is not None:
        out["harmful_weight_mass"] = harmful_weight_mass(weights, y)
    return out


def mean_std(runs: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """Per-metric (mean, sample std with ddof=1; 0 for a single run), ignoring NaNs."""
    keys: list[str] = []
    for r in runs:
        keys.extend(k for k in r if k not in keys)
    out: dict[str, tuple[float, float]] = {}
    for key in keys:
        vals = np.array([r[key] for r in runs if key in r and not np.isnan(r[key])], dtype=np.float64)
        if vals.size == 0:
            out[key] = (float("nan"), float("nan"))
        else:
            out[key] = (float(vals.mean()), float(vals.std(ddof=1)) if vals.size > 1 else 0.0)
    return out
