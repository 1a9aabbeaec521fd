"""Baselines for safety-aware data selection, run on the same splits and features as SOT.

Every baseline returns a float64 score vector of length n (the corpus) where **higher = keep**,
so all of them go through the same metrics (:mod:`sotjax.eval.metrics`).

* :func:`random_scores`: i.i.d. uniform scores (the chance level).
* :func:`dsir_scores`: DSIR (Xie et al. 2023, "Data Selection for Language Models via Importance
  Resampling"), hashed n-gram importance weights toward the safe anchor. The reference
  implementation is the ``data-selection`` package (``HashedNgramDSIR``, v1.0.3); it imports
  ``nltk`` and ``joblib``, which are not available offline here, so this is a line-for-line
  reimplementation of its scoring path: lower-case, NLTK ``WordPunctTokenizer`` (regex
  ``\\w+|[^\\w\\s]+``), unigrams + bigrams (bigram = the two tokens joined by a space), each hashed
  by ``int(sha256(utf8).hexdigest(), 16) % num_buckets`` (10,000 buckets); bag-of-ngrams
  models ``p_raw`` (the corpus) and ``p_target`` (the anchor) are normalised bucket counts;
  ``score_i = Σ_b c_ib · (log(p_target,b + 1e-8) − log(p_raw,b + 1e-8))``, the log importance
  weight. (DSIR then resamples with Gumbel top-k on these; ranking by the log-weight is its
  deterministic limit. The package's ``min_example_length=100`` filter is not applied: most
  dialogue pairs are shorter than 100 tokens.)
* :func:`bidirectional_anchor_scores`: He, Xia & Henderson (2024), "What is in your safe data?":
  ``harm_i = mean_j cos(z_i, h_j) − mean_k cos(z_i, s_k)``; score = −harm_i.
* :func:`knn_harmful_scores`: mean cosine distance to the k nearest harmful references
  (far from harmful = keep).
* :func:`length_scores`: ``−(len(prompt) + len(response))`` in characters: a sanity baseline.
  On the offline benchmark benign dialogue is short and the injected harmful answers are long, so
  length alone separates them well; any method should be read against it.
* :func:`gotd_scores`: GOT-D (Kang et al., ICLR 2024), single-reference OT toward the safe anchor:
  solve entropic OT (ott-jax ``PointCloud`` + ``Sinkhorn``, cosine cost 1 − cos, uniform
  marginals) from the corpus to the anchor; the corpus dual potential f_i is the gradient of
  OT_ε with respect to the corpus marginal (up to a constant), so a lower f_i means moving mass
  onto i lowers the distance to the anchor. score = −(f_i − mean f).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

_WORDPUNCT = re.compile(r"\w+|[^\w\s]+")


def random_scores(n: int, seed: int = 0) -> np.ndarray:
    """Uniform(0, 1) scores from ``numpy.random.default_rng(seed)``."""
    return np.random.default_rng(seed).random(int(n))


# --------------------------------------------------------------------------- DSIR

def wordpunct_tokenize(text: str) -> list[str]:
    """NLTK ``WordPunctTokenizer`` (regex ``\\w+|[^\\w\\s]+``)."""
    return _WORDPUNCT.findall(text)


def _bucket(token: str, num_buckets: int) -> int:
    return int(hashlib.sha256(token.encode("utf-8")).hexdigest(), 16) % num_buckets


def hashed_ngram_counts(text: str, num_buckets: int = 10_000, n: int = 2) -> np.ndarray:
    """Bucket counts of the unigrams … n-grams of ``text.lower()`` (data-selection's featuriser)."""
    words = wordpunct_tokenize(text.lower())
    counts = np.zeros(num_buckets, dtype=np.int64)
    for w in words:
        counts[_bucket(w, num_buckets)] += 1
    for order in range(2, n + 1):
        for i in range(len(words) - order + 1):
            counts[_bucket(" ".join(words[i:i + order]), num_buckets)] += 1
    return counts


def _bucket_lists(
    texts: Sequence[str], num_buckets: int, n: int, cache: dict[str, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Sparse hashed n-gram occurrences: (row index, bucket) per n-gram occurrence."""
    rows: list[int] = []
    buckets: list[int] = []
    for row, text in enumerate(texts):
        words = wordpunct_tokenize(text.lower())
        grams = list(words)
        for order in range(2, n + 1):
            grams.extend(" ".join(words[i:i + order]) for i in range(len(words) - order + 1))
        for g in grams:
            b = cache.get(g)
            if b is None:
                b = cache[g] = _bucket(g, num_buckets)
            rows.append(row)
            buckets.append(b)
    return np.asarray(rows, dtype=np.int64), np.asarray(buckets, dtype=np.int64)


def pair_text(prompt: str, response: str) -> str:
    """The text DSIR featurises for a prompt/response pair: ``prompt + "\\n" + response``."""
    return prompt if not response else f"{prompt}\n{response}"


def dsir_scores(
    corpus_texts: Sequence[str],
    target_texts: Sequence[str],
    num_buckets: int = 10_000,
    ngrams: int = 2,
    raw_texts: Sequence[str] | None = None,
) -> np.ndarray:
    """DSIR log importance weights of ``corpus_texts`` toward ``target_texts``.

    ``score_i = c_i · (log(p_target + 1e-8) − log(p_raw + 1e-8))`` with ``c_i`` the hashed
    n-gram counts of text i and ``p_*`` the normalised summed counts of the target texts and of
    the raw texts (default: the corpus itself, as DSIR fits the raw model on the raw pool).
    """
    if len(corpus_texts) == 0 or len(target_texts) == 0:
        raise ValueError("dsir_scores needs non-empty corpus and target texts")
    cache: dict[str, int] = {}
    c_rows, c_buckets = _bucket_lists(corpus_texts, num_buckets, ngrams, cache)
    _, t_buckets = _bucket_lists(target_texts, num_buckets, ngrams, cache)
    r_buckets = c_buckets if raw_texts is None else _bucket_lists(raw_texts, num_buckets, ngrams, cache)[1]
    if t_buckets.size == 0 or r_buckets.size == 0:
        raise ValueError("dsir_scores: target or raw texts contain no tokens")
    # compact the bucket ids that occur (sparse: works for any num_buckets)
    used, inverse = np.unique(np.concatenate([c_buckets, t_buckets, r_buckets]), return_inverse=True)
    c_idx = inverse[: c_buckets.size]
    t_idx = inverse[c_buckets.size: c_buckets.size + t_buckets.size]
    r_idx = inverse[c_buckets.size + t_buckets.size:]
    t = np.bincount(t_idx, minlength=used.size).astype(np.float64)
    r = np.bincount(r_idx, minlength=used.size).astype(np.float64)
    # buckets that never occur have p = 0 in both models: log(1e-8) − log(1e-8) = 0, no effect
    log_diff = np.log(t / t.sum() + 1e-8) - np.log(r / r.sum() + 1e-8)
    return np.bincount(c_rows, weights=log_diff[c_idx], minlength=len(corpus_texts)).astype(np.float64)


def length_scores(texts: Sequence[str]) -> np.ndarray:
    """Sanity baseline: shorter text = keep, ``score_i = −len(text_i)`` (characters)."""
    return -np.array([len(t) for t in texts], dtype=np.float64)


# --------------------------------------------------------------------------- embedding baselines

def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {x.shape}")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    if (norm == 0).any():
        raise ValueError("zero-norm embedding: cosine is undefined")
    return x / norm


def bidirectional_anchor_scores(corpus: np.ndarray, safe: np.ndarray, harmful: np.ndarray) -> np.ndarray:
    """He et al. (2024): ``−(mean_j cos(z_i, h_j) − mean_k cos(z_i, s_k))``.

    Uses ``mean_j cos(z_i, h_j) = ẑ_i · mean_j ĥ_j`` (unit vectors), so it is O(n·d).
    """
    z = _unit(corpus)
    h_bar = _unit(harmful).mean(axis=0)
    s_bar = _unit(safe).mean(axis=0)
    return -(z @ h_bar - z @ s_bar)


def knn_harmful_scores(corpus: np.ndarray, harmful: np.ndarray, k: int = 5, block: int = 2048) -> np.ndarray:
    """Mean cosine distance ``1 − cos`` from each corpus row to its k nearest harmful references."""
    z = _unit(corpus)
    h = _unit(harmful)
    k = int(min(k, h.shape[0]))
    if k < 1:
        raise ValueError("k must be ≥ 1")
    out = np.empty(z.shape[0], dtype=np.float64)
    for start in range(0, z.shape[0], block):
        dist = 1.0 - z[start:start + block] @ h.T
        part = np.partition(dist, k - 1, axis=1)[:, :k]
        out[start:start + block] = part.mean(axis=1)
    return out


def gotd_scores(
    corpus: np.ndarray,
    safe: np.ndarray,
    epsilon: float = 0.1,
    threshold: float = 1e-6,
    max_iterations: int = 5000,
) -> np.ndarray:
    """GOT-D: ``−(f − mean f)`` for the corpus potential f of entropic OT(corpus → anchor).

    Cosine cost via unit vectors scaled by 1/√2: ``‖x̂/√2 − ŷ/√2‖² = 1 − cos(x, y)``, so
    ott-jax's squared-Euclidean point cloud computes exactly the cosine cost. ``epsilon`` is
    absolute (the same scale as SOT's ε). Computed in float64 is not required: potentials are
    centred before ranking.
    """
    import jax.numpy as jnp
    from ott.geometry import pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn

    if epsilon <= 0:
        raise ValueError("epsilon must be > 0")
    x = jnp.asarray(_unit(corpus) / np.sqrt(2.0), dtype=jnp.float32)
    y = jnp.asarray(_unit(safe) / np.sqrt(2.0), dtype=jnp.float32)
    geom = pointcloud.PointCloud(x, y, epsilon=float(epsilon))
    prob = linear_problem.LinearProblem(geom)
    out = sinkhorn.Sinkhorn(threshold=threshold, max_iterations=max_iterations)(prob)
    f = np.asarray(out.f, dtype=np.float64)
    if not np.isfinite(f).all():
        raise FloatingPointError("GOT-D: Sinkhorn potentials are not finite")
    return -(f - f.mean())


BASELINES = ("random", "length", "dsir", "bidirectional_anchor", "knn_harmful", "gotd")


def run_baselines(
    corpus: np.ndarray,
    safe: np.ndarray,
    harmful: np.ndarray,
    corpus_texts: Sequence[str] | None = None,
    safe_texts: Sequence[str] | None = None,
    seed: int = 0,
    epsilon: float = 0.1,
    knn_k: int = 5,
) -> dict[str, np.ndarray]:
    """Scores of every baseline (DSIR only when texts are given); higher = keep."""
    out = {
        "random": random_scores(corpus.shape[0], seed),
        "bidirectional_anchor": bidirectional_anchor_scores(corpus, safe, harmful),
        "knn_harmful": knn_harmful_scores(corpus, harmful, k=knn_k),
        "gotd": gotd_scores(corpus, safe, epsilon=epsilon),
    }
    if corpus_texts is not None:
        out["length"] = length_scores(corpus_texts)
    if corpus_texts is not None and safe_texts is not None:
        out["dsir"] = dsir_scores(corpus_texts, safe_texts)
    return {k: out[k] for k in BASELINES if k in out}
