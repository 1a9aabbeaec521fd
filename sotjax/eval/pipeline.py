"""The evaluation pipeline shared by ``sotjax demo``, ``sotjax eval`` and the quality benchmark.

benchmark (records) → features (embeddings) → SOT fit + one-sided ablations + baselines →
keep-scores → metrics. Pure functions of arrays where possible; JAX is imported lazily.

Scores. Every method yields a keep-score per corpus row (higher = keep). For SOT the score is
the learned **logit** (``w = softmax(logits)``: the same order as the weights, without the
ties that underflowed weights would create); its simplex weights also give the harmful weight
mass. Ablations: ``pull-only`` (λ = 0, safe anchor only) and ``push-only`` (λ = 1, harmful
reference only), the paper's one-sided variants.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sotjax.data.benchmark import Benchmark
from sotjax.eval import baselines as B
from sotjax.eval import metrics as M

FEATURES = ("smollm2", "minilm", "ngram")


def hashed_ngram_features(texts: Sequence[str], dim: int = 256, num_buckets: int = 2**18, seed: int = 0) -> np.ndarray:
    """Cheap, model-free text features: hashed unigram+bigram counts, random ±1 projection to ``dim``.

    ``z_i = Σ_g c_ig · r_{h(g)}`` where ``h`` hashes an n-gram (as DSIR does) and ``r_b ∈ {±1}^dim``
    is a fixed pseudo-random sign vector per bucket (derived from SHA-256 of the bucket and
    ``seed``): a Johnson–Lindenstrauss sketch of the bag of n-grams. Used by the fast tests and
    as a no-model fallback; not the paper's feature.
    """
    out = np.zeros((len(texts), dim), dtype=np.float64)
    cache: dict[int, np.ndarray] = {}
    for i, text in enumerate(texts):
        words = B.wordpunct_tokenize(text.lower())
        grams = words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]
        for g in grams:
            b = int(hashlib.sha256(g.encode("utf-8")).hexdigest(), 16) % num_buckets
            r = cache.get(b)
            if r is None:
                rng = np.random.default_rng([seed, b])
                r = cache[b] = rng.choice(np.array([-1.0, 1.0]), size=dim)
            out[i] += r
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    out[norms[:, 0] == 0, 0] = 1.0  # empty text: a fixed direction, never a zero vector
    return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def embed_benchmark(
    bm: Benchmark,
    features: str = "smollm2",
    cache_dir: str | Path | None = None,
    progress: bool = False,
    layer: int = -1,
    pooling: str = "auto",
) -> dict[str, np.ndarray]:
    """Embeddings ``{"corpus", "safe", "harmful"}`` of the benchmark's (prompt, response) pairs
    (``layer``/``pooling``: :class:`sotjax.features.FeatureConfig`'s; the n-gram sketch has neither)."""
    if features not in FEATURES:
        from sotjax.errors import SotjaxInputError

        raise SotjaxInputError(f"--features must be one of {FEATURES}, got {features!r}")
    out: dict[str, np.ndarray] = {}
    if features == "ngram":
        for which in ("corpus", "safe", "harmful"):
            set_prompts, set_responses = bm.texts(which)
            pairs = zip(set_prompts, set_responses, strict=True)
            out[which] = hashed_ngram_features([B.pair_text(p, r) for p, r in pairs])
        return out
    from sotjax.features import FeatureConfig, embed_texts

    kwargs: dict[str, Any] = {"model": features, "layer": layer, "pooling": pooling}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    cfg = FeatureConfig(**kwargs)
    # one call for all three sets (one model load); split afterwards
    sizes = [len(bm.corpus), len(bm.safe), len(bm.harmful)]
    prompts: list[str] = []
    responses: list[str] = []
    for which in ("corpus", "safe", "harmful"):
        p, r = bm.texts(which)
        prompts += p
        responses += r
    emb = np.asarray(embed_texts(prompts, responses, config=cfg, progress=progress), dtype=np.float32)
    a, b = sizes[0], sizes[0] + sizes[1]
    return {"corpus": emb[:a], "safe": emb[a:b], "harmful": emb[b:]}


def condition(emb: Mapping[str, np.ndarray], spec: str) -> tuple[dict[str, np.ndarray], Any]:
    """The sets conditioned with ``spec`` (:meth:`sotjax.conditioning.ConditioningConfig.parse`), fitted
    label-free on them exactly as :func:`sotjax.fit` fits it; returns ``(conditioned sets, Conditioner or
    None for raw)``.

    The evaluation conditions once and runs every method — SOT with ``conditioning="raw"``, its
    one-sided ablations (which :func:`sotjax.fit` would otherwise fit on fewer sets) and the
    embedding baselines — on the same conditioned features.
    """
    from sotjax.conditioning import Conditioner, ConditioningConfig

    cfg = ConditioningConfig.parse(spec)
    if cfg.is_identity:
        return dict(emb), None
    fitted = Conditioner.fit_problem(cfg, emb["corpus"], emb["safe"], emb["harmful"])
    return {k: fitted.apply(v) for k, v in emb.items()}, fitted


@dataclasses.dataclass(frozen=True)
class MethodRun:
    """Keep-scores of one method (and, for SOT variants, the fit result)."""

    name: str
    scores: np.ndarray
    weights: np.ndarray | None = None
    result: Any = None
    seconds: float = 0.0


def run_sot(
    emb: Mapping[str, np.ndarray], config: Any, progress: bool = False, name: str = "SOT (push-pull)"
) -> MethodRun:
    """Fit SOT with ``config`` (a :class:`sotjax.SOTConfig`); score = logits."""
    import sotjax

    t0 = time.perf_counter()
    res = sotjax.fit(emb["corpus"], emb["safe"], emb["harmful"], config, progress=progress)
    return MethodRun(
        name=name,
        scores=np.asarray(res.logits, dtype=np.float64),
        weights=np.asarray(res.weights, dtype=np.float64),
        result=res,
        seconds=time.perf_counter() - t0,
    )


def run_ablations(emb: Mapping[str, np.ndarray], config: Any, suffix: str = "") -> list[MethodRun]:
    """Pull-only (λ = 0) and push-only (λ = 1) with otherwise the same config."""
    out = []
    for lam, name in ((0.0, "pull-only (λ=0)"), (1.0, "push-only (λ=1)")):
        cfg = dataclasses.replace(config, lam=lam)
        out.append(run_sot(emb, cfg, name=name + suffix))
    return out


def run_baseline_methods(
    bm: Benchmark,
    emb: Mapping[str, np.ndarray],
    seed: int = 0,
    epsilon: float = 0.1,
    embedding_only: bool = False,
    suffix: str = "",
) -> list[MethodRun]:
    """Every baseline of :mod:`sotjax.eval.baselines` on the same split and features.

    ``embedding_only`` skips random, text length and DSIR (which do not use the features).
    """
    corpus_texts = [B.pair_text(p, r) for p, r in zip(*bm.texts("corpus"), strict=True)]
    safe_texts = [B.pair_text(p, r) for p, r in zip(*bm.texts("safe"), strict=True)]
    runs = []
    steps: list[tuple[str, Callable[[], np.ndarray]]] = [
        ("random", lambda: B.random_scores(len(bm.corpus), seed)),
        ("text length (sanity)", lambda: B.length_scores(corpus_texts)),
        ("DSIR (n-gram → safe)", lambda: B.dsir_scores(corpus_texts, safe_texts)),
        (
            "bidirectional anchor (He et al.)",
            lambda: B.bidirectional_anchor_scores(emb["corpus"], emb["safe"], emb["harmful"]),
        ),
        ("kNN distance to harmful (k=5)", lambda: B.knn_harmful_scores(emb["corpus"], emb["harmful"], k=5)),
        ("GOT-D (OT potential → safe)", lambda: B.gotd_scores(emb["corpus"], emb["safe"], epsilon=epsilon)),
    ]
    if embedding_only:
        steps = [st for st in steps if st[0] not in ("random", "text length (sanity)") and not st[0].startswith("DSIR")]
    for name, fn in steps:
        t0 = time.perf_counter()
        s = np.asarray(fn(), dtype=np.float64)
        runs.append(MethodRun(name=name + suffix, scores=s, seconds=time.perf_counter() - t0))
    return runs


def evaluate_runs(
    runs: Sequence[MethodRun], is_harmful: np.ndarray, keep: float = 0.8
) -> dict[str, dict[str, float]]:
    """Metrics of every run (harmful weight mass only for runs with simplex weights)."""
    out: dict[str, dict[str, float]] = {}
    for run in runs:
        finite = bool(np.isfinite(run.scores).all()) and (run.weights is None or bool(np.isfinite(run.weights).all()))
        if finite:
            m = M.evaluate_scores(run.scores, is_harmful, keep=keep, weights=run.weights)
            m["failed"] = 0.0
        else:  # a diverged fit: record it, never rank NaNs
            metric_names = ("auroc", "auprc", "harmful_retention", "benign_recall", "harmful_weight_mass")
            m = {k: float("nan") for k in metric_names}
            m["failed"] = 1.0
        m["seconds"] = run.seconds
        out[run.name] = m
    return out
