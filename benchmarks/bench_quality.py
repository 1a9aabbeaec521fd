"""Selection quality of SOT on the offline real-text benchmark: baselines, ablations, sweeps.

Modes (``--mode``):

* ``dev``: the conditioning candidates on the development splits, and the default they select
  by the rule fixed in :data:`DEV_RULE` (written before any evaluation split was looked at);
* ``matrix``: the evaluation matrix (2 benign domains × 2 contamination sources × {task, general}
  anchors × p ∈ {0.01, 0.05, 0.1, 0.3} × seeds 0–4), every method on the same splits and features;
* ``demo``: the default demo's setting (``sotjax demo``) on evaluation seeds 0–4;
* ``legacy``: the earlier main table and sweeps (below).

    python benchmarks/bench_quality.py --mode dev --features smollm2 minilm --out /tmp/dev.md
    python benchmarks/bench_quality.py --mode matrix --features smollm2 minilm --out /tmp/matrix.md
    python benchmarks/bench_quality.py --features smollm2 minilm --seeds 5 --out benchmarks/RESULTS_quality.md

For each feature type and each evaluation seed (0 … seeds−1; nothing is tuned on them) it builds
the benchmark (``sotjax.data``), embeds it (on-disk cache), and measures, with the known
contamination labels (``sotjax.eval.metrics``), mean ± std over seeds of:

* main (p = 0.1, N_s = 50, many-shot harmful reference, Top-80%): SOT push-pull with the default
  ``SOTConfig``; ablations pull-only (λ = 0), push-only (λ = 1), general-safe anchor, prompt-only
  harmful reference (AdvBench); baselines random, DSIR, bidirectional anchor, kNN-to-harmful, GOT-D;
* keep ∈ {0.1 … 0.9} (same scores, no refit);
* p ∈ {0, 0.05, 0.1, 0.2, 0.3}; N_s ∈ {10, 50, 200}; λ ∈ {0, 0.25, 0.5, 0.75, 1};
  losses transport / regularized / divergence (``--sweeps`` selects which).

Writes a Markdown report (``--out``) and the raw per-seed numbers (``--json``). Rows are referred to
by counts only; no text is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sotjax  # noqa: E402
from sotjax.data import BenchmarkConfig, build_benchmark, load_asset_pools  # noqa: E402
from sotjax.eval import metrics as M  # noqa: E402
from sotjax.eval import pipeline as P  # noqa: E402
from sotjax.report import metrics_table_markdown  # noqa: E402

SWEEPS = ("keep", "p", "n_safe", "lam", "loss")
KEEPS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
PS = (0.0, 0.05, 0.1, 0.2, 0.3)
N_SAFES = (10, 50, 200)
LAMS = (0.0, 0.25, 0.5, 0.75, 1.0)
LOSSES = ("transport", "regularized", "divergence")
SOT_NAME = "SOT (push-pull)"
STD = " [z-scored]"
# methods reported in the keep-fraction sweep
KEEP_SWEEP_METHODS = (
    SOT_NAME,
    "DSIR (n-gram → safe)",
    "text length (sanity)",
    "bidirectional anchor (He et al.)",
    "GOT-D (OT potential → safe)",
    "random",
)


class Recorder:
    """Collects (experiment, setting, method) → list of per-seed metric dicts."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str], list[dict[str, float]]] = {}

    def add(self, experiment: str, setting: str, method: str, metrics: dict[str, float]) -> None:
        self.rows.setdefault((experiment, setting, method), []).append(metrics)

    def table(self, experiment: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for (exp, setting, method), runs in self.rows.items():
            if exp == experiment:
                label = method if not setting else f"{setting} · {method}"
                out[label] = M.mean_std(runs)
        return out

    def to_json(self) -> list[dict[str, Any]]:
        return [{"experiment": e, "setting": s, "method": m, "runs": r} for (e, s, m), r in self.rows.items()]


def sot_metrics(bm, emb, cfg, keep: float = 0.8) -> dict[str, float]:
    run = P.run_sot(emb, cfg)
    m = P.evaluate_runs([run], bm.is_harmful, keep=keep)[run.name]  # NaN where undefined (p = 0) or diverged
    if m["failed"]:
        print(f"  warning: fit returned non-finite weights ({run.result.message})", file=sys.stderr)
    m["seconds"] = run.seconds
    m["steps"] = float(run.result.n_steps)
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", nargs="+", default=["smollm2"], choices=P.FEATURES)
    ap.add_argument("--seeds", type=int, default=5, help="evaluation seeds 0 … seeds-1")
    ap.add_argument("--sweep-seeds", type=int, default=None, help="seeds for the sweeps (default: --seeds)")
    ap.add_argument("--sweeps", nargs="*", default=list(SWEEPS), choices=SWEEPS)
    ap.add_argument("--n-corpus", type=int, default=1000)
    ap.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "sotjax", "embeddings"))
    ap.add_argument("--out", default="benchmarks/RESULTS_quality.md")
    ap.add_argument("--json", default=None, help="raw per-seed results (default: OUT with .json)")
    ap.add_argument("--standardized", action="store_true",
                    help="also run SOT, ablations and embedding baselines on z-scored features (standardize)")
    ap.add_argument("--mode", choices=("legacy", "dev", "matrix", "demo"), default="legacy")
    ap.add_argument("--layer", type=int, default=-1, help="dev/matrix/demo: hidden-state layer of the features")
    ap.add_argument("--pooling", choices=("auto", "last", "mean"), default="auto",
                    help="dev/matrix/demo: pooling of the token states (auto: the model's own)")
    ap.add_argument("--conditioning", default=None,
                    help="matrix/demo: the conditioning of 'SOT (default)' (default: SOTConfig's default)")
    args = ap.parse_args(argv)
    if args.mode != "legacy":
        from quality_protocol import run_mode  # noqa: PLC0415 - benchmarks/ is on sys.path when run as a script

        return run_mode(args, argv)

    pools = load_asset_pools()
    base_cfg = sotjax.SOTConfig()
    seeds = list(range(args.seeds))
    sweep_seeds = list(range(args.sweep_seeds if args.sweep_seeds is not None else args.seeds))
    t_start = time.perf_counter()
    sections: list[str] = []
    raw: dict[str, Any] = {}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", file=sys.stderr, flush=True)

    for features in args.features:
        rec = Recorder()
        embed_seconds = 0.0

        def bench(seed: int, features: str = features, **kw: Any):
            nonlocal embed_seconds
            bm = build_benchmark(BenchmarkConfig(n_corpus=args.n_corpus, seed=seed, **kw), pools)
            t0 = time.perf_counter()
            emb = P.embed_benchmark(bm, features, cache_dir=args.cache_dir)
            embed_seconds += time.perf_counter() - t0
            return bm, emb

        for seed in seeds:
            log(f"{features}: main, seed {seed}")
            bm, emb = bench(seed)
            runs = (
                [P.run_sot(emb, base_cfg)]
                + P.run_ablations(emb, base_cfg)
                + P.run_baseline_methods(bm, emb, seed=seed, epsilon=base_cfg.epsilon)
            )
            for name, m in P.evaluate_runs(runs, bm.is_harmful, keep=0.8).items():
                rec.add("main", "", name, m)
            if args.standardized:
                emb_s, _ = P.condition(emb, "standardize")
                runs_s = [P.run_sot(emb_s, base_cfg, name=SOT_NAME + STD)]
                runs_s += P.run_ablations(emb_s, base_cfg, suffix=STD)
                runs_s += P.run_baseline_methods(
                    bm, emb_s, seed=seed, epsilon=base_cfg.epsilon, embedding_only=True, suffix=STD
                )
                for name, m in P.evaluate_runs(runs_s, bm.is_harmful, keep=0.8).items():
                    rec.add("standardized", "", name, m)
            if "keep" in args.sweeps:
                for keep in KEEPS:
                    for run in runs:
                        if not np.isfinite(run.scores).all():
                            continue
                        if run.name in KEEP_SWEEP_METHODS:
                            keep_metrics = M.evaluate_scores(run.scores, bm.is_harmful, keep=keep, weights=run.weights)
                            rec.add("keep", f"keep={keep:.1f}", run.name, keep_metrics)
            bm_g, emb_g = bench(seed, safe_variant="general")
            rec.add("main", "", "ablation: general-safe anchor", sot_metrics(bm_g, emb_g, base_cfg))
            bm_a, emb_a = bench(seed, harmful_variant="advbench")
            rec.add("main", "", "variant: prompt-only harmful ref. (AdvBench)", sot_metrics(bm_a, emb_a, base_cfg))

        for seed in sweep_seeds:
            if "p" in args.sweeps:
                for p in PS:
                    log(f"{features}: p={p}, seed {seed}")
                    bm, emb = bench(seed, p=p)
                    rec.add("p", f"p={p}", SOT_NAME, sot_metrics(bm, emb, base_cfg))
            if "n_safe" in args.sweeps:
                for ns in N_SAFES:
                    log(f"{features}: n_safe={ns}, seed {seed}")
                    bm, emb = bench(seed, n_safe=ns)
                    rec.add("n_safe", f"N_s={ns}", SOT_NAME, sot_metrics(bm, emb, base_cfg))
            if "lam" in args.sweeps or "loss" in args.sweeps:
                bm, emb = bench(seed)
                if "lam" in args.sweeps:
                    for lam in LAMS:
                        log(f"{features}: lam={lam}, seed {seed}")
                        lam_cfg = dataclasses.replace(base_cfg, lam=lam)
                        rec.add("lam", f"λ={lam}", SOT_NAME, sot_metrics(bm, emb, lam_cfg))
                if "loss" in args.sweeps:
                    for loss in LOSSES:
                        log(f"{features}: loss={loss}, seed {seed}")
                        loss_cfg = dataclasses.replace(base_cfg, loss=loss)
                        rec.add("loss", f"loss={loss}", SOT_NAME, sot_metrics(bm, emb, loss_cfg))

        titles = {
            "main": f"Main: p = 0.1, N_s = 50, Top-80%, {len(seeds)} seeds",
            "standardized": "Main, features z-scored per dimension (conditioning `standardize`)",
            "keep": "Keep fraction sweep (same scores)",
            "p": "Contamination fraction sweep (AUROC/AUPRC undefined at p = 0)",
            "n_safe": "Safe-anchor size sweep",
            "lam": "λ sweep (0 = pull only, 1 = push only)",
            "loss": "Loss sweep",
        }
        sections.append(
            f"## Features: {features}\n\nEmbedding time (all sets, cache included): {embed_seconds:.1f} s\n"
        )
        for exp in ("main", "standardized", *[s for s in SWEEPS if s in args.sweeps]):
            table = rec.table(exp)
            if table:
                failed = [
                    f"{name}: {int(round(v['failed'][0] * n))} of {n}"
                    for (e, st, meth), runs in rec.rows.items()
                    if e == exp
                    for name, v, n in [(f"{st} · {meth}" if st else meth, M.mean_std(runs), len(runs))]
                    if "failed" in v and v["failed"][0] > 0
                ]
                note = (
                    ("\nFits that returned non-finite weights (left out of the means): " + "; ".join(failed) + "\n")
                    if failed
                    else ""
                )
                sections.append(f"### {titles[exp]}\n\n{metrics_table_markdown(table)}\n{note}")
        raw[features] = rec.to_json()
        write_outputs(args, argv, sections, raw, base_cfg, t_start)
    return 0


def write_outputs(args: argparse.Namespace, argv: list[str] | None, sections: list[str], raw: dict[str, Any],
                  base_cfg: Any, t_start: float) -> None:
    """Write the Markdown report and the raw JSON (called after each feature type)."""
    cmd = "python benchmarks/bench_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        "# Selection quality on the offline real-text benchmark\n\n"
        f"Command: `{cmd}`\n\n"
        f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores (shared), Python {platform.python_version()}; "
        f"total {time.perf_counter() - t_start:.0f} s.\n\n"
        f"SOT config (defaults, not tuned on these seeds): `{dataclasses.asdict(base_cfg)}`\n\n"
        "Metrics: mean ± std over seeds. AUROC of the keep-score (SOT: logits) for benign vs injected "
        "harmful; AUPRC for flagging harmful by low score; Top-K metrics under random tie-breaking. "
        "A fit that returned non-finite weights is counted in `failed` and left out of the means.\n"
    )
    text = header + "\n" + "\n".join(sections)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    json_path.write_text(json.dumps(raw, indent=1, default=float) + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
