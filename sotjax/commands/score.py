"""`sotjax score`: score unseen samples with the weight head of a run (no OT solve, O(n d), streamed).

The run must have been written by ``sotjax weigh --head linear|mlp``. Each row of ``--corpus`` goes
through what the training rows went through: the run's feature conditioning (``conditioning.npz``),
unit normalisation, the head. A ``.npy`` corpus is memory-mapped and read ``--chunk-rows`` rows at a
time; the output Parquet file (``id``, ``logit``) is written atomically, chunk by chunk.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

HELP = "score unseen samples with the weight head of a run (sotjax weigh --head): id, logit per row"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, type=Path, help="run directory written by `sotjax weigh --head ...`")
    p.add_argument("--corpus", required=True, type=Path,
                   help="samples to score: embeddings (.npy, .jsonl, .parquet) from the run's feature model, or "
                        "text records when the run was fitted on text (embedded with the run's feature settings)")
    p.add_argument("--ids", type=Path, help="ids of the rows of a .npy corpus (default <stem>.ids.npy beside it, "
                                             "else row numbers)")
    p.add_argument("--out", required=True, type=Path, help="output Parquet file (id, logit), written atomically")
    p.add_argument("--chunk-rows", type=int, default=65536, metavar="N", help="rows per chunk (default 65536)")
    t = p.add_argument_group("text inputs")
    t.add_argument("--cache-dir", type=Path, default=None, help="embedding cache directory (default: none)")
    t.add_argument("--prompt-field", default="prompt")
    t.add_argument("--response-field", default="response")
    t.add_argument("--text-field", default="text")
    t.add_argument("--id-field", default="id")
    p.add_argument("--no-progress", action="store_true", help="no progress output")


def _check_out(out: Path, run: Path, inputs: list[Path | None]) -> None:
    from sotjax.errors import SotjaxInputError

    where = f"--out {out}"
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise SotjaxInputError(f"{where}: exists and is not a regular file; give a new .parquet path")
    resolved = out.resolve()
    if run.resolve() == resolved or run.resolve() in resolved.parents:
        raise SotjaxInputError(f"{where}: is inside the run directory {run}; write the scores elsewhere")
    for item in inputs:
        if item is not None and Path(item).resolve() == resolved:
            raise SotjaxInputError(f"{where}: is the input {item}; give a new path for the output")
    parent = resolved.parent
    if not parent.is_dir():
        raise SotjaxInputError(f"{where}: its directory {parent} does not exist")


def _corpus_features(args: argparse.Namespace, head: Any) -> tuple[Any, Any]:
    """``(x, ids)`` of ``--corpus``: embeddings as they are (a ``.npy`` memory-mapped), text embedded with
    the feature settings the run recorded; the feature model checked against the head's where known."""
    from sotjax import io
    from sotjax.errors import SotjaxInputError
    from sotjax.head import embedding_meta

    corpus = Path(args.corpus)
    recorded = head.features or {}
    fingerprint = recorded.get("model_fingerprint")
    if not corpus.exists():
        raise SotjaxInputError(f"{corpus}: no such file")
    if io.holds_embeddings(corpus):
        x, ids = io.read_embeddings(corpus, args.ids)
        found = embedding_meta(corpus).get("model_fingerprint")
        if fingerprint is not None and found is not None and found != fingerprint:
            raise SotjaxInputError(f"{corpus}: embedded with another feature model (fingerprint {str(found)[:16]}) "
                                   f"than the head of {args.run} ({str(fingerprint)[:16]}); embed it with the "
                                   "run's model")
        return x, ids
    settings = recorded.get("features")
    if recorded.get("kind") != "text" or not isinstance(settings, dict):
        raise SotjaxInputError(f"{corpus}: holds text, but the head of {args.run} was trained on embeddings whose "
                               "feature model the run does not record; give embeddings of the same model")
    import dataclasses

    from sotjax.features import FeatureConfig
    from sotjax.pipeline import TextInputOptions, read_set

    names = {f.name for f in dataclasses.fields(FeatureConfig)}
    values = {k: v for k, v in settings.items() if k in names}
    values["cache_dir"] = args.cache_dir
    try:
        features = FeatureConfig(**values)
    except (TypeError, ValueError) as err:
        raise SotjaxInputError(f"{args.run}: head.json: the recorded feature settings are not usable ({err})"
                               ) from None
    options = TextInputOptions(features, args.prompt_field, args.response_field, args.id_field, args.text_field)
    x, ids, info = read_set(corpus, args.ids, options, progress=not args.no_progress)
    found = info.get("model_fingerprint")
    if fingerprint is not None and found is not None and found != fingerprint:
        raise SotjaxInputError(f"{corpus}: the run's feature model {features.model!r} now has another fingerprint "
                               f"({str(found)[:16]}) than when the head was trained ({str(fingerprint)[:16]})")
    return x, ids


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sotjax.atomic import atomic_path
    from sotjax.errors import SotjaxInputError
    from sotjax.rundir import read_run
    from sotjax.runtime import enable_compilation_cache

    if args.chunk_rows < 1:
        raise SotjaxInputError(f"--chunk-rows: must be >= 1, got {args.chunk_rows}")
    _check_out(Path(args.out), Path(args.run), [args.corpus, args.ids])
    enable_compilation_cache()
    head = read_run(args.run).read_head()
    t0 = time.perf_counter()
    x, ids = _corpus_features(args, head)
    if x.ndim != 2 or x.shape[1] != head.dim:
        got = x.shape[1] if x.ndim == 2 else x.shape
        raise SotjaxInputError(f"{args.corpus}: embedding dimension {got} does not match the head's feature "
                               f"dimension {head.dim} ({args.run})")
    ids = np.asarray(ids, dtype=object)
    schema = pa.schema([("id", pa.string()), ("logit", pa.float64())])
    t_score = time.perf_counter()
    with atomic_path(args.out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for start, logits in head.iter_scores(x, args.chunk_rows, str(args.corpus)):
            chunk_ids = [str(i) for i in ids[start:start + logits.shape[0]].tolist()]
            writer.write_table(pa.table({"id": pa.array(chunk_ids, pa.string()), "logit": pa.array(logits)},
                                        schema=schema))
            if not args.no_progress and sys.stderr.isatty():
                print(f"\rsotjax score: {start + logits.shape[0]}/{x.shape[0]} rows", end="", file=sys.stderr)
    t_end = time.perf_counter()
    if not args.no_progress and sys.stderr.isatty():
        print(file=sys.stderr)
    rate = x.shape[0] / max(t_end - t_score, 1e-9)
    print(f"sotjax score: scored {x.shape[0]} rows with the {head.config.kind} head of {args.run} in "
          f"{t_end - t0:.2f} s ({rate:,.0f} rows/s scoring); wrote {args.out}")
    return 0
