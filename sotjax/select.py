r"""SOT Stage 2 input: Top-K hard truncation (paper Eq. 7) and the training weights.

Ranking uses the logits (equivalently the weights, without their float underflow) in
descending order; ties are broken by the original index, so the selection is deterministic.

Training weights on the kept set :math:`S` (|S| = K), rescaled so that they average 1
(the weighted, length-normalised NLL of Eq. 8 is then on the scale of the unweighted mean):

* ``"exp"`` (default; the literal Eq. 7 on simplex weights):
  :math:`w'_i = K\,e^{w_i} / \sum_{j\in S} e^{w_j}`. Because :math:`w_i \le 1`, it is close to
  uniform with a mild boost and stays usable when the learned weights collapse.
* ``"softmax"`` (Eq. 7 read on the logits): :math:`w'_i = K\,w_i / \sum_{j\in S} w_j`, the learned
  distribution restricted to Top-K; it can put nearly all mass on a few samples.

The effective sample size :math:`\mathrm{ESS} = (\sum_i w'_i)^2 / \sum_i w'^2_i` says how
concentrated each reading is (K = uniform, 1 = a single sample).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from sotjax.errors import SotjaxInputError


@dataclasses.dataclass(frozen=True)
class Selection:
    """Top-K selection of a corpus.

    Attributes:
      selected: ``(n,)`` bool, True for the K kept samples.
      rank: ``(n,)`` int, 0 for the highest-weighted sample.
      train_weight: ``(n,)`` training weights, 0 for dropped samples, mean 1 over the kept ones.
      keep_count: K.
      ess: effective sample size of ``train_weight`` on the kept set.
      reweight: which reading of Eq. 7 produced ``train_weight``.
    """

    selected: np.ndarray
    rank: np.ndarray
    train_weight: np.ndarray
    keep_count: int
    ess: float
    reweight: str

    @property
    def selected_indices(self) -> np.ndarray:
        """Indices of the kept samples, best first."""
        return np.argsort(self.rank)[: self.keep_count]


def resolve_keep_count(n: int, keep: float = 0.8, keep_count: int | None = None) -> int:
    """K from an absolute count or a fraction (rounded half up, at least 1)."""
    if keep_count is not None:
        if isinstance(keep_count, bool) or not isinstance(keep_count, (int, np.integer)):
            raise SotjaxInputError(f"keep_count={keep_count!r}: must be an integer")
        if keep_count < 1 or keep_count > n:
            raise SotjaxInputError(f"keep_count={keep_count}: must be between 1 and the corpus size {n}")
        return int(keep_count)
    if not (0.0 < keep <= 1.0):
        raise SotjaxInputError(f"keep={keep!r}: must be a fraction in (0, 1]")
    return max(1, min(n, math.floor(keep * n + 0.5)))


def rank_scores(scores: np.ndarray) -> np.ndarray:
    """Rank (0 = best) by descending score, ties by ascending index."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(scores.shape[0]), -scores))
    rank = np.empty(scores.shape[0], dtype=np.int64)
    rank[order] = np.arange(scores.shape[0])
    return rank


def effective_sample_size(weights: np.ndarray) -> float:
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum()
    return float(total * total / np.sum(w * w)) if total > 0 else 0.0


def train_weights(weights: np.ndarray, selected: np.ndarray, reweight: str = "exp") -> np.ndarray:
    """Training weights from simplex ``weights`` (mean 1 on the kept set, 0 elsewhere).

    See the module docstring for the two readings of Eq. 7.
    """
    weights = np.asarray(weights, dtype=np.float64)
    kept = np.flatnonzero(selected)
    if reweight == "exp":
        score = np.exp(weights[kept])
    elif reweight == "softmax":
        score = weights[kept]
        if score.sum() <= 0:  # every kept weight underflowed: the restriction is undefined
            score = np.ones_like(score)
    else:
        raise SotjaxInputError(f"reweight={reweight!r}: must be one of exp, softmax")
    out = np.zeros_like(weights)
    out[kept] = score * (kept.size / score.sum())
    return out


def select(
    weights: np.ndarray,
    keep: float = 0.8,
    keep_count: int | None = None,
    reweight: str = "exp",
    logits: np.ndarray | None = None,
) -> Selection:
    """Top-K of the corpus by learned weight (higher = keep).

    Args:
      weights: ``(n,)`` simplex weights (e.g. ``SOTResult.weights``) or any nonnegative scores.
      keep, keep_count: K as a fraction of ``n`` or as a count (the count wins).
      reweight: ``"exp"`` or ``"softmax"`` (module docstring).
      logits: optional ``(n,)`` logits with ``weights = softmax(logits)``; when given they set the
        ranking, which keeps the order of weights that underflowed to 0.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or weights.size == 0:
        raise SotjaxInputError(f"weights: expected a non-empty 1-D array, got shape {weights.shape}")
    if logits is not None and np.shape(logits) != weights.shape:
        raise SotjaxInputError(f"logits: shape {np.shape(logits)} does not match weights {weights.shape}")
    k = resolve_keep_count(weights.size, keep, keep_count)
    rank = rank_scores(weights if logits is None else logits)
    selected = rank < k
    tw = train_weights(weights, selected, reweight)
    return Selection(selected, rank, tw, k, effective_sample_size(tw[selected]), reweight)
