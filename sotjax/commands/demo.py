"""``sotjax demo``: the main job on real offline data, end to end.

Builds the offline benchmark (benign dialogue contaminated with human-rated harmful QA pairs, a
held-out safe anchor, a disjoint harmful reference; see ``docs/evaluation.md``), embeds it
(SmolLM2-135M-Instruct last-token features by default, cached on disk), learns the SOT weights,
keeps the Top-K, evaluates against the known labels together with the one-sided ablations and
the baselines, and writes a run directory with the weights table and a self-contained HTML report.
The summary printed names rows by count only; no prompt or response text is ever printed.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

HELP = "run SOT end to end on the offline real-text benchmark and write a report"
FORMATTER = argparse.ArgumentDefaultsHelpFormatter  # `sotjax demo --help` shows every default


def default_cache_dir() -> Path:
    from sotjax.runtime import cache_root

    return cache_root() / "embeddings"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sotjax.data.benchmark import BENIGN_DOMAINS, CONTAMINATIONS, HARMFUL_VARIANTS

    parser.add_argument("--features", choices=("smollm2", "minilm", "ngram"), default="smollm2",
                        help="smollm2: the paper's last-token features (default); minilm: sentence encoder; "
                             "ngram: model-free hashed n-gram sketch (fast, for smoke tests)")
    parser.add_argument("--layer", type=int, default=-1,
                        help="hidden-state layer of the feature model, HF indexing (-1 = the last)")
    parser.add_argument("--pooling", choices=("auto", "last", "mean"), default="auto",
                        help="token states -> one vector (auto: last token for SmolLM2, the paper's feature; mean "
                             "for MiniLM)")
    parser.add_argument("--out", default="sotjax-demo",
                        help="run directory to write (atomically; an existing one only if sotjax wrote it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every benchmark split")
    parser.add_argument("--p", type=float, default=0.1, help="harmful fraction injected into the corpus")
    parser.add_argument("--n-corpus", type=int, default=1000, help="corpus size")
    parser.add_argument("--n-safe", type=int, default=50, help="safe-anchor size")
    parser.add_argument("--n-harmful", type=int, default=None,
                        help="harmful-reference size; None = the whole reference")
    parser.add_argument("--safe-variant", choices=("task", "general"), default="task",
                        help="safe anchor: task-specific or general safe dialogue")
    parser.add_argument("--harmful-variant", choices=HARMFUL_VARIANTS,
                        default="many_shot", help="source of the harmful reference set (not the contamination's)")
    parser.add_argument("--benign-domain", choices=BENIGN_DOMAINS, default="dialogue",
                        help="benign rows: dialogue (short chit-chat; length-confounded) or tasks (generated worked "
                             "word problems, length-matched to the harmful rows)")
    parser.add_argument("--contamination", choices=CONTAMINATIONS, default="pyrit_harm",
                        help="injected harmful pairs: pyrit_harm (human-rated) or many_shot (then use "
                             "--harmful-variant pyrit_harm)")
    parser.add_argument("--keep", type=float, default=0.8, help="Top-K fraction kept")
    from sotjax.config import LOSSES, SOTConfig

    defaults = SOTConfig()
    parser.add_argument("--lam", type=float, default=defaults.lam, help="push weight λ")
    parser.add_argument("--epsilon", type=float, default=defaults.epsilon, help="entropic ε (cost units)")
    parser.add_argument("--loss", choices=LOSSES, default=defaults.loss, help="Stage-1 loss")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()),
                        help="embedding cache (from $SOTJAX_CACHE, else $XDG_CACHE_HOME/sotjax, else ~/.cache/sotjax)")
    parser.add_argument("--conditioning", default=defaults.conditioning, metavar="SPEC",
                        help="label-free feature conditioning fitted on the three sets and applied before the cosine "
                             "cost (raw = the paper's features as they are; see README, Feature conditioning)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the baselines and ablations")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _sot_config(args: argparse.Namespace):
    import sotjax

    kw = {"keep": args.keep}
    for name in ("lam", "epsilon", "loss", "conditioning"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    return sotjax.SOTConfig(**kw)


def run(args: argparse.Namespace) -> int:
    import sotjax
    from sotjax import rundir
    from sotjax.data import BenchmarkConfig, build_benchmark
    from sotjax.errors import SotjaxInputError
    from sotjax.eval import pipeline as P
    from sotjax.io import to_jsonable
    from sotjax.pipeline import run_stats, versions
    from sotjax.report import interpretation, metrics_table_markdown

    t_start = time.perf_counter()
    from sotjax.runtime import enable_compilation_cache

    enable_compilation_cache()
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    rundir.check_output_dir(args.out, [cache_dir])
    if not 0.0 < args.keep <= 1.0:
        raise SotjaxInputError(f"--keep must be in (0, 1], got {args.keep}")
    sot_cfg = _sot_config(args)
    bm_cfg = BenchmarkConfig(
        n_corpus=args.n_corpus, p=args.p, n_safe=args.n_safe, n_harmful=args.n_harmful, seed=args.seed,
        safe_variant=args.safe_variant, harmful_variant=args.harmful_variant,
        benign_domain=args.benign_domain, contamination=args.contamination,
    )
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))

    bm = build_benchmark(bm_cfg)
    sizes = bm.report["sizes"]
    log(f"benchmark: corpus {sizes['corpus']} ({sizes['injected_harmful']} injected harmful), "
        f"safe anchor {sizes['safe']} ({args.safe_variant}), "
        f"harmful reference {sizes['harmful']} ({args.harmful_variant})")

    t0 = time.perf_counter()
    try:
        emb = P.embed_benchmark(bm, args.features, cache_dir=cache_dir, progress=not args.quiet, layer=args.layer,
                                pooling=args.pooling)
    except ValueError as err:  # a FeatureConfig field
        raise SotjaxInputError(f"invalid option: {err}") from None
    t_embed = time.perf_counter() - t0
    log(f"features: {args.features}, d = {emb['corpus'].shape[1]}, {t_embed:.1f} s")
    # condition once (fitted label-free on the three sets, as sotjax.fit does); SOT, its ablations and the
    # embedding baselines all see the same conditioned features
    emb_c, conditioner = P.condition(emb, sot_cfg.conditioning)
    fit_cfg = sot_cfg.replace(conditioning="raw")
    sot = P.run_sot(emb_c, fit_cfg, progress=not args.quiet)
    res = sot.result
    sel = sotjax.select(res.weights, keep=args.keep, logits=res.logits)
    runs = [sot]
    if not args.no_baselines:
        runs += P.run_ablations(emb_c, fit_cfg)
        runs += P.run_baseline_methods(bm, emb_c, seed=args.seed, epsilon=sot_cfg.epsilon)
    is_harmful = bm.is_harmful
    metrics = P.evaluate_runs(runs, is_harmful, keep=args.keep)
    kept_harmful = int((sel.selected & is_harmful).sum())

    ids = bm.ids("corpus")
    config: dict[str, Any] = {  # the run-directory schema's config.json (sotjax.rundir)
        "sot": sot_cfg.to_dict(),
        "benchmark": bm_cfg.to_dict(),
        "features": args.features,
        "feature_options": {"layer": args.layer, "pooling": args.pooling},
        "keep": args.keep,
        "sotjax_version": getattr(sotjax, "__version__", "unknown"),
        "versions": versions(),
    }
    shapes = {"n": int(emb["corpus"].shape[0]), "dim": int(emb["corpus"].shape[1]),
              "n_safe": int(emb["safe"].shape[0]), "n_harmful": int(emb["harmful"].shape[0])}
    stats = run_stats(res, sel, shapes)  # the same stats.json as `sotjax weigh`, plus the benchmark's
    stats["timings_s"]["embed"] = t_embed
    stats["benchmark"] = dict(bm.report)
    stats["kept_harmful"] = kept_harmful
    info = {"config": config, "fit": {"message": res.message, "n_steps": res.n_steps, "timings": res.timings},
            "benchmark": dict(bm.report)}
    reading = interpretation(metrics, sot.name, keep=args.keep, n_injected=sizes["injected_harmful"],
                             features=args.features, conditioning=sot_cfg.conditioning)
    out = Path(args.out)
    with rundir.writing_run(out, "demo", [cache_dir]) as run:
        run.write_weights(ids, res.weights, res.logits, sel)
        run.write_benchmark(bm.manifest())
        run.write_embeddings(emb)  # the model's raw features; conditioning.npz holds the fitted map
        run.write_conditioner(conditioner)
        run.write_config(config)
        run.write_stats(stats)
        run.write_metrics(metrics)
        run.write_report(
            weights=res.weights, logits=res.logits, is_harmful=is_harmful, metrics=metrics,
            objective=res.objective, pull=res.pull, push=res.push,
            corpus=emb_c["corpus"], safe=emb_c["safe"], harmful=emb_c["harmful"], keep=args.keep,
            info=to_jsonable(info),
            reading=reading,
            notes=[f"Features: {args.features}, conditioning {sot_cfg.conditioning}. Benchmark seed {args.seed}, "
                   f"p = {args.p}, benign domain {args.benign_domain}, contamination {args.contamination}, "
                   f"Top-{args.keep:.0%}. Rows are referred to by id only."],
        )

    m = metrics[sot.name]
    print(f"sotjax demo: {len(ids)} samples ({sizes['injected_harmful']} injected harmful), features {args.features}")
    print(f"  fit: {res.message}; {res.timings.get('total', float('nan')):.1f} s")
    print(f"  Top-{args.keep:.0%}: kept {sel.keep_count}, of which harmful {kept_harmful}/{sizes['injected_harmful']}; "
          f"AUROC {m['auroc']:.4f}, AUPRC {m['auprc']:.4f}, harmful weight mass {m['harmful_weight_mass']:.2e}")
    if len(metrics) > 1:
        print(metrics_table_markdown(metrics))
    print("What these numbers mean:")
    for line in reading:
        print(textwrap.fill(line, width=110, initial_indent="  - ", subsequent_indent="    "))
    print(f"  wrote {out}/ (report.html, weights.parquet, …) in {time.perf_counter() - t_start:.1f} s")
    return 0
