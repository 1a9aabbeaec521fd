"""``sotjax eval``: selection-quality metrics and baselines for a run directory.

Reads the run with :func:`sotjax.rundir.read_run` (any kind; the schema is documented there): the
learned weights (``weights.parquet``: ``id, weight, logit``), the labels (the run's
``benchmark.parquet``, or ``--labels`` for any ``sotjax weigh`` run: a JSONL/Parquet file with
``id`` and ``label`` ∈ {benign, harmful}) and, for the embedding baselines, the run's
``embeddings.npz``. DSIR needs the texts: it runs when the run's benchmark can be rebuilt from
``config.json`` (same ids). Writes ``eval.json`` and ``eval.md`` into the run directory and prints
the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = "metrics (AUROC, AUPRC, harmful kept in Top-K, …) and baselines for a run directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (from `sotjax demo` or `sotjax weigh`)")
    parser.add_argument("--keep", type=float, default=None, help="Top-K fraction (default: the run's, else 0.8)")
    parser.add_argument("--labels", default=None,
                        help="JSONL/Parquet with id,label (default: the run's benchmark.parquet)")
    parser.add_argument("--no-baselines", action="store_true", help="metrics of the run's weights only")
    parser.add_argument("--no-write", action="store_true",
                        help="only print the table (eval.json/eval.md are written only into sotjax's own runs)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the random baseline (default: the run's benchmark seed, else 0)")


def _harmful_mask(where: Path, pairs: list[tuple[Any, Any]], ids: list[str]) -> Any:
    """``is_harmful`` per id from ``(id, label)`` pairs read from ``where`` (one-line errors naming it)."""
    import numpy as np

    from sotjax.errors import SotjaxInputError, shorten

    labels = {str(i): lab for i, lab in pairs}
    bad = {v for v in labels.values()} - {"benign", "harmful"}
    if bad:
        found = [shorten(v) for v in sorted(map(str, bad))[:3]]
        raise SotjaxInputError(f"{where}: field 'label' must be 'benign' or 'harmful', found {', '.join(found)}")
    missing = [i for i in ids if i not in labels]
    if missing:
        raise SotjaxInputError(f"{where}: {len(missing)} ids of weights.parquet have no label (first: {missing[0]!r})")
    return np.array([labels[i] == "harmful" for i in ids], dtype=bool)


def _read_labels(path: Path, ids: list[str]) -> Any:
    """``--labels``: JSONL or Parquet with ``id`` and ``label`` (a benchmark manifest: its corpus rows)."""
    from sotjax.errors import SotjaxInputError
    from sotjax.io import iter_jsonl, read_parquet_columns

    if not path.exists():
        raise SotjaxInputError(f"{path}: no labels; pass --labels FILE with id,label")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        cols = read_parquet_columns(path, ["id", "label"])
        if "set" in pq.read_schema(path).names:  # a benchmark manifest: corpus rows only
            in_corpus = read_parquet_columns(path, ["set"])["set"] == "corpus"
            cols = {k: v[in_corpus] for k, v in cols.items()}
        pairs = list(zip(cols["id"].tolist(), cols["label"].tolist(), strict=True))
    else:
        pairs = []
        for lineno, obj in iter_jsonl(path):
            if "id" not in obj or "label" not in obj:
                raise SotjaxInputError(f"{path}: line {lineno}: fields 'id' and 'label' are required")
            pairs.append((str(obj["id"]), obj["label"]))
    return _harmful_mask(path, pairs, ids)


def _run_labels(run: Any) -> Any:
    """The labels of a run's own corpus rows, from its ``benchmark.parquet``."""
    from sotjax import rundir
    from sotjax.errors import SotjaxInputError

    where = run.path / rundir.BENCHMARK
    if not run.has(rundir.BENCHMARK):
        raise SotjaxInputError(f"{where}: no labels; pass --labels FILE with id,label")
    manifest = run.read_benchmark()
    rows = manifest["set"] == "corpus" if "set" in manifest else slice(None)
    return _harmful_mask(where, list(zip(manifest["id"][rows].tolist(), manifest["label"][rows].tolist(),
                                         strict=True)), list(run.ids))


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from sotjax import rundir
    from sotjax.data import BenchmarkConfig, build_benchmark
    from sotjax.errors import SotjaxInputError
    from sotjax.eval import metrics as M
    from sotjax.eval import pipeline as P
    from sotjax.report import metrics_table_markdown

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise SotjaxInputError(f"{run_dir}: run directory not found")
    if not args.no_write and not rundir.is_run_dir(run_dir):
        raise SotjaxInputError(
            f"{run_dir}: not a sotjax run directory (no valid {rundir.MARKER} marker, or files sotjax did "
            "not write); eval writes only into its own runs: pass --no-write to print only")
    run = rundir.read_run(run_dir)
    ids = list(run.ids)
    keep = args.keep if args.keep is not None else (run.keep if run.keep is not None else 0.8)
    if not 0.0 < keep <= 1.0:
        raise SotjaxInputError(f"--keep must be in (0, 1], got {keep}")
    seed = args.seed if args.seed is not None else (run.seed if run.seed is not None else 0)
    is_harmful = _read_labels(Path(args.labels), ids) if args.labels else _run_labels(run)

    runs = [P.MethodRun(name="SOT (this run)", scores=run.logits, weights=run.weights)]
    notes = []
    if not args.no_baselines:
        if run.has(rundir.EMBEDDINGS):
            emb = run.read_embeddings()
            conditioner = run.read_conditioner()  # the baselines see the features the run's cost saw
            if conditioner is not None:
                emb = {k: conditioner.apply(v) for k, v in emb.items()}
            bm = None
            if run.benchmark_config is not None:
                try:
                    bm = build_benchmark(BenchmarkConfig(**run.benchmark_config))
                except (SotjaxInputError, TypeError):
                    bm = None
                if bm is not None and list(bm.ids("corpus")) != ids:
                    bm = None
            if bm is not None:
                epsilon = run.epsilon if run.epsilon is not None else 0.1
                runs += P.run_baseline_methods(bm, emb, seed=seed, epsilon=epsilon)
            else:
                notes.append("DSIR skipped: the run's benchmark texts could not be rebuilt")
                from sotjax.eval import baselines as B

                for name, s in B.run_baselines(emb["corpus"], emb["safe"], emb["harmful"], seed=seed).items():
                    runs.append(P.MethodRun(name=name, scores=s))
        else:
            notes.append(f"baselines skipped: {rundir.EMBEDDINGS} not found")

    metrics = P.evaluate_runs(runs, is_harmful, keep=keep)
    k = int(M.resolve_k(len(ids), keep=keep))
    table = metrics_table_markdown(metrics)
    header = (f"# sotjax eval: {run_dir}\n\n{len(ids)} samples, {int(np.sum(is_harmful))} harmful, "
              f"Top-{keep:.0%} (K = {k})\n\n")
    text = header + table + "\n" + "".join(f"\n{n}\n" for n in notes)
    print(text, end="")
    if args.no_write:
        return 0
    rundir.write_eval(run_dir, {"keep": keep, "k": k, "metrics": metrics, "notes": notes}, text)
    return 0
