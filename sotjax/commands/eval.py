"""``sotjax eval``: selection-quality metrics and baselines for a run directory.

Reads the learned weights (``weights.parquet``: ``id, weight, logit``), the labels (the run's
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


def _read_labels(path: Path, ids: list[str]) -> Any:

    import numpy as np

    from sotjax.errors import SotjaxInputError, shorten
    from sotjax.eval import rundir

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        cols = rundir.read_parquet_columns(path, ["id", "label"])
        if "set" in pq.read_schema(path).names:  # a benchmark manifest: corpus rows only
            in_corpus = rundir.read_parquet_columns(path, ["set"])["set"] == "corpus"
            cols = {k: v[in_corpus] for k, v in cols.items()}
        pairs = list(zip(cols["id"].tolist(), cols["label"].tolist(), strict=True))
    else:
        if not path.is_file():
            raise SotjaxInputError(f"{path}: file not found")
        from sotjax.io import iter_jsonl

        rows = []
        for lineno, obj in iter_jsonl(path):
            if "id" not in obj or "label" not in obj:
                raise SotjaxInputError(f"{path}: line {lineno}: fields 'id' and 'label' are required")
            rows.append((str(obj["id"]), obj["label"]))
        pairs = rows
    labels = dict(pairs)
    bad = {v for v in labels.values()} - {"benign", "harmful"}
    if bad:
        found = [shorten(v) for v in sorted(map(str, bad))[:3]]
        raise SotjaxInputError(f"{path}: field 'label' must be 'benign' or 'harmful', found {', '.join(found)}")
    missing = [i for i in ids if i not in labels]
    if missing:
        raise SotjaxInputError(f"{path}: {len(missing)} ids of weights.parquet have no label (first: {missing[0]!r})")
    return np.array([labels[i] == "harmful" for i in ids], dtype=bool)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from sotjax import rundir as run_directory
    from sotjax.atomic import write_text_atomic
    from sotjax.data import BenchmarkConfig, build_benchmark
    from sotjax.errors import SotjaxInputError
    from sotjax.eval import metrics as M
    from sotjax.eval import pipeline as P
    from sotjax.eval import rundir
    from sotjax.report import metrics_table_markdown

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise SotjaxInputError(f"{run_dir}: run directory not found")
    if not args.no_write and not run_directory.is_run_dir(run_dir):
        raise SotjaxInputError(
            f"{run_dir}: not a sotjax run directory (no valid {run_directory.MARKER} marker, or files sotjax did "
            "not write); eval writes only into its own runs: pass --no-write to print only")
    w = rundir.read_parquet_columns(run_dir / "weights.parquet", ["id", "weight", "logit"])
    ids = [str(i) for i in w["id"].tolist()]
    config = rundir.read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else {}
    keep = args.keep if args.keep is not None else float(config.get("keep", config.get("sot", {}).get("keep", 0.8)))
    if not 0.0 < keep <= 1.0:
        raise SotjaxInputError(f"--keep must be in (0, 1], got {keep}")
    seed = args.seed if args.seed is not None else int(config.get("benchmark", {}).get("seed", 0))
    labels_path = Path(args.labels) if args.labels else run_dir / "benchmark.parquet"
    if not labels_path.exists():
        raise SotjaxInputError(f"{labels_path}: no labels; pass --labels FILE with id,label")
    is_harmful = _read_labels(labels_path, ids)

    weights = np.asarray(w["weight"], dtype=np.float64)
    logits = np.asarray(w["logit"], dtype=np.float64)
    runs = [P.MethodRun(name="SOT (this run)", scores=logits, weights=weights)]
    notes = []
    emb_path = run_dir / "embeddings.npz"
    if not args.no_baselines:
        if emb_path.is_file():
            emb = _read_embeddings_npz(emb_path)
            if emb["corpus"].shape[0] != len(ids):
                raise SotjaxInputError(
                    f"{emb_path}: corpus has {emb['corpus'].shape[0]} rows, weights.parquet {len(ids)}")
            bm = None
            if "benchmark" in config:
                try:
                    bm = build_benchmark(BenchmarkConfig(**config["benchmark"]))
                except (SotjaxInputError, TypeError):
                    bm = None
                if bm is not None and bm.ids("corpus") != ids:
                    bm = None
            if bm is not None:
                epsilon = float(config.get("sot", {}).get("epsilon", 0.1))
                runs += P.run_baseline_methods(bm, emb, seed=seed, epsilon=epsilon)
            else:
                notes.append("DSIR skipped: the run's benchmark texts could not be rebuilt")
                from sotjax.eval import baselines as B

                for name, s in B.run_baselines(emb["corpus"], emb["safe"], emb["harmful"], seed=seed).items():
                    runs.append(P.MethodRun(name=name, scores=s))
        else:
            notes.append(f"baselines skipped: {emb_path.name} not found")

    metrics = P.evaluate_runs(runs, is_harmful, keep=keep)
    k = int(M.resolve_k(len(ids), keep=keep))
    table = metrics_table_markdown(metrics)
    header = (f"# sotjax eval: {run_dir}\n\n{len(ids)} samples, {int(is_harmful.sum())} harmful, "
              f"Top-{keep:.0%} (K = {k})\n\n")
    text = header + table + "\n" + "".join(f"\n{n}\n" for n in notes)
    print(text, end="")
    if args.no_write:
        return 0
    report = {"keep": keep, "k": k, "metrics": metrics, "notes": notes}
    write_text_atomic(run_dir / "eval.json", rundir.dumps_json(report))
    write_text_atomic(run_dir / "eval.md", text)
    return 0


def _read_embeddings_npz(path: Path) -> dict[str, Any]:
    """``corpus``/``safe``/``harmful`` float arrays of a run's ``embeddings.npz`` (never unpickled)."""
    import zipfile

    import numpy as np

    from sotjax.errors import SotjaxInputError

    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("corpus", "safe", "harmful") if k not in z.files]
            if missing:
                raise SotjaxInputError(f"{path}: array(s) {', '.join(missing)} missing")
            emb = {k: z[k] for k in ("corpus", "safe", "harmful")}
    except ValueError as err:
        if "pickle" in str(err):
            raise SotjaxInputError(f"{path}: holds pickled (object) arrays; refusing to unpickle") from None
        raise SotjaxInputError(f"{path}: not a readable .npz of arrays ({type(err).__name__})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise SotjaxInputError(f"{path}: not a readable .npz of arrays ({type(err).__name__})") from None
    for k, v in emb.items():
        if v.ndim != 2 or not np.issubdtype(v.dtype, np.floating):
            raise SotjaxInputError(f"{path}: array '{k}' must be a 2-D float array, got {v.dtype} {v.shape}")
    return emb
