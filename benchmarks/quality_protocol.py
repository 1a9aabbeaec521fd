"""The development/evaluation protocol of the selection-quality benchmark (issue 11).

Written down, with the selection rule, **before** any evaluation split was run with a candidate
conditioning (``benchmarks/RESULTS_quality.md`` repeats it at the top):

* **Development splits** (choose here, nothing else): seeds 1000–1002, n = 400 corpus rows,
  p = 0.2, N_s = 30 task anchor, contamination PyRIT harm pairs, many-shot harmful reference,
  both benign domains (dialogue, generated tasks), both feature models (SmolLM2, MiniLM):
  3 × 2 × 2 = 12 development cells. The composition (size, p, anchor size) and the seeds differ
  from every evaluation split.
* **Candidates** (:data:`CANDIDATES`): raw, centring, z-scoring, all-but-the-top with 1/3/10
  directions, z-scoring + all-but-the-top 3, shrinkage whitening (0.1, 0.5), z-scoring fitted on the
  references only. Last layer, last token (the paper's feature) throughout.
* **Rule** (:data:`DEV_RULE`): the default is the candidate with the highest mean SOT AUROC over
  the 12 development cells; candidates within 0.005 of the best are tied and the tie goes to the
  lower mean harmful-kept fraction at Top-80%, then to the simpler map (the order of
  :data:`CANDIDATES`). One default for every feature model.
* **Evaluation splits** (report once, after the default is fixed): seeds 0–4, n = 600, N_s = 50,
  p ∈ {0.01, 0.05, 0.1, 0.3}, benign domain ∈ {dialogue, tasks}, contamination ∈ {PyRIT harm
  (reference many-shot), many-shot (reference PyRIT harm)}, anchor ∈ {task, general}: 160 cells
  per feature model; every method on the same split and the same (conditioned) features.
  ``demo`` mode: the default demo's own setting (n = 1000, p = 0.1, N_s = 50, dialogue, PyRIT harm,
  many-shot reference, task anchor), seeds 0–4.

**Rule v2** (written 2026-12-08 after the evaluation above, before any evaluation split was run with a
pooling other than the model's own): the candidates are pooling ∈ {last, mean} × the conditionings
above, on the same 12 development cells (a pooling applies to both models: ``last`` = the last real
token's state, ``mean`` = the masked mean over tokens); the same rule (highest mean SOT AUROC, ties
within 0.005 to the lower harmful kept, then to the model's own pooling and the simpler map) chooses one
(pooling, conditioning). Development result: mean pooling + raw (SmolLM2 0.975, MiniLM 0.969; mean
0.972; the best last-pooling pair is last + standardize at 0.964). It is evaluated once, on the
evaluation splits above (``--pooling mean --conditioning raw``), before any default changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import sotjax
from sotjax.data import BenchmarkConfig, build_benchmark, load_asset_pools
from sotjax.eval import pipeline as P

CANDIDATES = ("raw", "center", "standardize", "abtt:1", "abtt:3", "abtt:10", "standardize+abtt:3", "whiten:0.1",
              "whiten:0.5", "standardize@references")
DEV_RULE = ("highest mean SOT AUROC over the development cells; within 0.005 of the best: lower mean harmful kept "
            "at Top-80%, then the simpler map (candidate order)")
DEV_SEEDS = (1000, 1001, 1002)
DEV_SPLIT = {"n_corpus": 400, "p": 0.2, "n_safe": 30, "contamination": "pyrit_harm", "harmful_variant": "many_shot",
             "safe_variant": "task"}
DOMAINS = ("dialogue", "tasks")
EVAL_SEEDS = (0, 1, 2, 3, 4)
EVAL_PS = (0.01, 0.05, 0.1, 0.3)
EVAL_N, EVAL_NS = 600, 50
#: contamination source -> the harmful reference used with it (disjoint by construction)
CONTAMINATIONS = {"pyrit_harm": "many_shot", "many_shot": "pyrit_harm"}
ANCHORS = ("task", "general")
DEMO_SPLIT = {"n_corpus": 1000, "p": 0.1, "n_safe": 50}
SOT_DEFAULT, SOT_RAW = "SOT (default conditioning)", "SOT (raw features, paper-exact)"
TEXT_BASELINES = ("text length (sanity)", "DSIR (n-gram → safe)")
PULL, PUSH = "pull-only (λ=0)", "push-only (λ=1)"


def _metrics(runs: Sequence[P.MethodRun], is_harmful: np.ndarray) -> dict[str, dict[str, float]]:
    return P.evaluate_runs(runs, is_harmful, keep=0.8)


class Bench:
    """Benchmark instances and their embeddings (on-disk cache), built on the pools once."""

    def __init__(self, cache_dir: str, layer: int = -1, pooling: str = "auto") -> None:
        self.pools = load_asset_pools()
        self.cache_dir = cache_dir
        self.layer, self.pooling = layer, pooling  # the feature (FeatureConfig.layer / .pooling)
        self.embed_seconds = 0.0

    def split(self, features: str, **kw: Any):
        bm = build_benchmark(BenchmarkConfig(**kw), self.pools)
        t0 = time.perf_counter()
        emb = P.embed_benchmark(bm, features, cache_dir=self.cache_dir, layer=self.layer, pooling=self.pooling)
        self.embed_seconds += time.perf_counter() - t0
        return bm, emb


def choose(dev: dict[str, dict[str, list[float]]]) -> str:
    """:data:`DEV_RULE` applied to ``{candidate: {"auroc": [...], "kept": [...]}}``."""
    mean = {c: float(np.mean(v["auroc"])) for c, v in dev.items()}
    best = max(mean.values())
    tied = [c for c in CANDIDATES if c in dev and mean[c] >= best - 0.005]
    return min(tied, key=lambda c: (round(float(np.mean(dev[c]["kept"])), 6), CANDIDATES.index(c)))


def run_dev(args: argparse.Namespace, bench: Bench, log) -> tuple[str, dict[str, Any]]:
    cfg = sotjax.SOTConfig(conditioning="raw")
    per: dict[str, dict[str, dict[str, list[float]]]] = {}
    pooled: dict[str, dict[str, list[float]]] = {c: {"auroc": [], "kept": []} for c in CANDIDATES}
    for features in args.features:
        per[features] = {c: {"auroc": [], "kept": []} for c in CANDIDATES}
        for domain in DOMAINS:
            for seed in DEV_SEEDS:
                log(f"dev {features} {domain} seed {seed}")
                bm, emb = bench.split(features, seed=seed, benign_domain=domain, **DEV_SPLIT)
                for cand in CANDIDATES:
                    emb_c, _ = P.condition(emb, cand)
                    run = P.run_sot(emb_c, cfg, name=cand)
                    m = _metrics([run], bm.is_harmful)[cand]
                    for store in (per[features][cand], pooled[cand]):
                        store["auroc"].append(m["auroc"])
                        store["kept"].append(m["harmful_retention"])
    chosen = choose(pooled)
    lines = ["| conditioning | " + " | ".join(f"{f} AUROC (mean / min) | {f} harmful kept" for f in args.features)
             + " | all cells: mean AUROC | mean kept |",
             "|---|" + "---|---|" * len(args.features) + "---|---|"]
    for cand in CANDIDATES:
        cells = []
        for f in args.features:
            a, k = per[f][cand]["auroc"], per[f][cand]["kept"]
            cells.append(f"{np.mean(a):.4f} / {np.min(a):.4f} | {np.mean(k):.1%}")
        mark = " **(chosen)**" if cand == chosen else ""
        lines.append(f"| `{cand}`{mark} | " + " | ".join(cells)
                     + f" | {np.mean(pooled[cand]['auroc']):.4f} | {np.mean(pooled[cand]['kept']):.1%} |")
    text = (f"## Development splits: choosing the default conditioning\n\nRule: {DEV_RULE}.\n"
            f"Cells: {len(args.features)} feature models × {len(DOMAINS)} domains × seeds {list(DEV_SEEDS)}; split "
            f"`{DEV_SPLIT}`.\n\n" + "\n".join(lines) + f"\n\nChosen by the rule: `{chosen}`.\n")
    return text, {"per_feature": per, "pooled": pooled, "chosen": chosen}


def _cell_runs(bm, emb, seed: int, spec: str, ablations: bool) -> list[P.MethodRun]:
    base = sotjax.SOTConfig(conditioning="raw")
    emb_c, _ = P.condition(emb, spec)
    runs = [P.run_sot(emb_c, base, name=SOT_DEFAULT)]
    if spec != "raw":
        runs.append(P.run_sot(emb, base, name=SOT_RAW))
    if ablations:
        runs += P.run_ablations(emb_c, base)
    runs += P.run_baseline_methods(bm, emb_c, seed=seed, epsilon=base.epsilon)
    return runs


def _fmt(vals: list[float], pct: bool = False) -> str:
    a = np.asarray([v for v in vals if np.isfinite(v)])
    if a.size == 0:
        return "–"
    return f"{a.mean():.1%} ± {a.std():.1%}" if pct else f"{a.mean():.3f} ± {a.std():.3f}"


def run_matrix(args: argparse.Namespace, bench: Bench, spec: str, log) -> tuple[str, dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for features in args.features:
        for domain in DOMAINS:
            for contamination, reference in CONTAMINATIONS.items():
                for anchor in ANCHORS:
                    for p in EVAL_PS:
                        for seed in EVAL_SEEDS[: args.seeds]:
                            log(f"matrix {features} {domain} {contamination} {anchor} p={p} seed {seed}")
                            bm, emb = bench.split(features, seed=seed, n_corpus=EVAL_N, n_safe=EVAL_NS, p=p,
                                                  benign_domain=domain, contamination=contamination,
                                                  harmful_variant=reference, safe_variant=anchor)
                            runs = _cell_runs(bm, emb, seed, spec, ablations=anchor == "task")
                            for name, m in _metrics(runs, bm.is_harmful).items():
                                records.append({"features": features, "domain": domain, "contamination": contamination,
                                                "anchor": anchor, "p": p, "seed": seed, "method": name,
                                                "auroc": m["auroc"], "kept": m["harmful_retention"],
                                                "failed": m["failed"]})
    return matrix_text(records, args.features), {"records": records}


def scorecard(records: list[dict[str, Any]], features_list: Sequence[str]) -> str:
    """The targets checked on the matrix: per feature model, benign domain and anchor, each method's mean
    AUROC and harmful kept over the cells (2 contaminations × 4 p × seeds), whether SOT (default) is >= each
    baseline on both, and the ablation order push-pull > pull-only > push-only (task anchor: the ablations
    run there only)."""
    out = ["### Scorecard (means over the 40 cells of each row; ✓ = SOT default at least as good on both)\n",
           "| features · domain · anchor | SOT default AUROC / kept | best baseline on AUROC | best baseline on kept "
           "| SOT ≥ every baseline (AUROC and kept) | push-pull > pull > push (AUROC) |",
           "|---|---|---|---|---|---|"]
    skip = {SOT_DEFAULT, SOT_RAW, PULL, PUSH, "random"}
    for features in features_list:
        for domain in DOMAINS:
            for anchor in ANCHORS:
                rows = [r for r in records if r["features"] == features and r["domain"] == domain
                        and r["anchor"] == anchor]
                if not rows:
                    continue

                def mean(meth: str, key: str, rows: list[dict[str, Any]] = rows) -> float:
                    vals = [r[key] for r in rows if r["method"] == meth and np.isfinite(r[key])]
                    return float(np.mean(vals)) if vals else float("nan")

                methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m not in skip]
                a0, k0 = mean(SOT_DEFAULT, "auroc"), mean(SOT_DEFAULT, "kept")
                best_a = max(methods, key=lambda m: mean(m, "auroc"))
                best_k = min(methods, key=lambda m: mean(m, "kept"))
                beats = [m for m in methods if not (a0 >= mean(m, "auroc") and k0 <= mean(m, "kept"))]
                order = [mean(m, "auroc") for m in (SOT_DEFAULT, PULL, PUSH)]
                ordered = "–" if not np.all(np.isfinite(order)) else (
                    f"{'✓' if order[0] > order[1] > order[2] else '✗'} ({order[0]:.3f} / {order[1]:.3f} / "
                    f"{order[2]:.3f})")
                out.append(f"| {features} · `{domain}` · {anchor} | {a0:.3f} / {k0:.1%} | {best_a} "
                           f"{mean(best_a, 'auroc'):.3f} | {best_k} {mean(best_k, 'kept'):.1%} | "
                           + ("✓" if not beats else "✗ (not ≥: " + ", ".join(beats) + ")") + f" | {ordered} |")
    return "\n".join(out) + "\n"


def matrix_text(records: list[dict[str, Any]], features_list: Sequence[str]) -> str:
    out = ["## Evaluation matrix\n",
           f"Seeds {list(EVAL_SEEDS)}, n = {EVAL_N}, N_s = {EVAL_NS}, p ∈ {list(EVAL_PS)}; each cell: AUROC / harmful "
           "kept at Top-80%, mean ± std over the 4 p × 5 seeds (20 splits). Embedding baselines run on the same "
           "conditioned features as SOT; length and DSIR use the text.\n", scorecard(records, features_list)]
    columns = [(c, a) for c in CONTAMINATIONS for a in ANCHORS]
    for features in features_list:
        for domain in DOMAINS:
            rows = [r for r in records if r["features"] == features and r["domain"] == domain]
            methods = list(dict.fromkeys(r["method"] for r in rows))
            out.append(f"### {features} · benign domain `{domain}`\n")
            heads = [f"{c} → ref {CONTAMINATIONS[c]}, {a} anchor" for c, a in columns]
            out.append("| method | " + " | ".join(heads) + " |")
            out.append("|---|" + "---|" * len(columns))
            for meth in methods:
                cells = []
                for c, a in columns:
                    sel = [r for r in rows if r["method"] == meth and r["contamination"] == c and r["anchor"] == a]
                    cells.append("–" if not sel else f"{_fmt([r['auroc'] for r in sel])} / "
                                                      f"{_fmt([r['kept'] for r in sel], pct=True)}")
                out.append(f"| {meth} | " + " | ".join(cells) + " |")
            out.append("")
            out.append("By p (PyRIT-harm contamination, task anchor): AUROC / harmful kept\n")
            out.append("| method | " + " | ".join(f"p = {p}" for p in EVAL_PS) + " |")
            out.append("|---|" + "---|" * len(EVAL_PS))
            for meth in methods:
                cells = []
                for p in EVAL_PS:
                    sel = [r for r in rows if r["method"] == meth and r["contamination"] == "pyrit_harm"
                           and r["anchor"] == "task" and r["p"] == p]
                    cells.append("–" if not sel else f"{_fmt([r['auroc'] for r in sel])} / "
                                                      f"{_fmt([r['kept'] for r in sel], pct=True)}")
                out.append(f"| {meth} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def run_demo(args: argparse.Namespace, bench: Bench, spec: str, log) -> tuple[str, dict[str, Any]]:
    records = []
    for features in args.features:
        for seed in EVAL_SEEDS[: args.seeds]:
            log(f"demo {features} seed {seed}")
            bm, emb = bench.split(features, seed=seed, **DEMO_SPLIT)
            runs = _cell_runs(bm, emb, seed, spec, ablations=True)
            for name, m in _metrics(runs, bm.is_harmful).items():
                records.append({"features": features, "seed": seed, "method": name, "auroc": m["auroc"],
                                "kept": m["harmful_retention"], "kept_count": round(m["harmful_retention"] * 100)})
    out = ["## The default demo's setting (`sotjax demo`: n = 1000, p = 0.1, N_s = 50, dialogue, PyRIT harm, "
           "many-shot reference, task anchor), seeds 0–4\n"]
    for features in args.features:
        rows = [r for r in records if r["features"] == features]
        out.append(f"### {features}\n")
        out.append("| method | AUROC | harmful kept (of 100) | worst seed: AUROC / kept |")
        out.append("|---|---|---|---|")
        for meth in dict.fromkeys(r["method"] for r in rows):
            sel = [r for r in rows if r["method"] == meth]
            worst = min(sel, key=lambda r: r["auroc"])
            out.append(f"| {meth} | {_fmt([r['auroc'] for r in sel])} | {_fmt([r['kept'] for r in sel], pct=True)} | "
                       f"{worst['auroc']:.3f} / {max(r['kept_count'] for r in sel)} |")
        out.append("")
    return "\n".join(out), {"records": records}


def run_mode(args: argparse.Namespace, argv: list[str] | None) -> int:
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)

    bench = Bench(args.cache_dir, args.layer, args.pooling)
    spec = args.conditioning or sotjax.SOTConfig().conditioning
    if args.mode == "dev":
        text, raw = run_dev(args, bench, log)
    elif args.mode == "matrix":
        text, raw = run_matrix(args, bench, spec, log)
    else:
        text, raw = run_demo(args, bench, spec, log)
    cmd = "python benchmarks/bench_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"Command: `{cmd}`; machine: {platform.platform()}, {os.cpu_count()} CPU cores (shared), load "
              f"{os.getloadavg()[0]:.1f} at the end; total {time.perf_counter() - t0:.0f} s (embedding incl. cache "
              f"{bench.embed_seconds:.0f} s). SOT config: `{dataclasses.asdict(sotjax.SOTConfig())}`; "
              f"'{SOT_DEFAULT}' = conditioning `{spec}`; features: layer {args.layer}, pooling "
              f"{args.pooling}.\n\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + text + "\n", encoding="utf-8")
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    json_path.write_text(json.dumps(raw, indent=1, default=float) + "\n", encoding="utf-8")
    print(header + text)
    return 0
