"""``sotjax audit``: the cross-set linkage audit (:mod:`sotjax.audit`) of a corpus, its safe anchor
and its harmful reference, written as an ``audit`` directory (:mod:`sotjax.rundir`).

Inputs are read as ``sotjax weigh`` reads them (:func:`sotjax.pipeline.read_set`): embeddings
(``.npy`` memory-mapped, ``.jsonl``/``.parquet`` with an ``embedding`` field) or text records,
embedded with the same feature options. Options and ``--out`` are checked before any work, and
the directory appears complete or not at all; bad input is one line, exit 2, nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HELP = ("find near-copies (cosine >= threshold) within the corpus and across corpus, safe anchor and "
        "harmful reference: links, duplicate clusters, anchor leakage")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sotjax import audit as A

    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--corpus", required=True, type=Path, help="corpus embeddings (.npy, .jsonl, .parquet) or text")
    io.add_argument("--safe", type=Path, help="safe-anchor embeddings or text (optional)")
    io.add_argument("--harmful", type=Path, help="harmful-reference embeddings or text (optional)")
    io.add_argument("--ids", type=Path, help="ids of the corpus rows for a .npy corpus (.npy or one id per line)")
    io.add_argument("--out", required=True, type=Path, help="output audit directory (written atomically)")
    io.add_argument("--no-progress", action="store_true", help="no progress bar (text inputs)")

    s = p.add_argument_group("search")
    s.add_argument("--threshold", type=float, default=A.DEFAULT_THRESHOLD,
                   help=f"cosine similarity at or above which two rows are linked (default {A.DEFAULT_THRESHOLD})")
    s.add_argument("--top-k", type=int, default=A.DEFAULT_TOP_K,
                   help="links kept per row at most (its best; rows with more are counted and reported; "
                        f"default {A.DEFAULT_TOP_K})")
    s.add_argument("--block-rows", type=int, default=A.DEFAULT_BLOCK_ROWS,
                   help=f"rows per tile of the blocked matrix product (default {A.DEFAULT_BLOCK_ROWS})")
    from sotjax.config import SOTConfig

    s.add_argument("--conditioning", default=SOTConfig().conditioning, metavar="SPEC",
                   help="feature conditioning before the cosine, fitted label-free on the given sets as `sotjax weigh` "
                        "fits it (raw = the features as they are; default: weigh's default)")
    s.add_argument("--backend", choices=A.BACKENDS, default="auto",
                   help="tile products by numpy or jax (auto: jax on an accelerator, numpy on a CPU)")

    from sotjax.commands.weigh import add_text_arguments

    add_text_arguments(p.add_argument_group("text inputs (files with prompt/response or text fields and no "
                                            "embedding), as in sotjax weigh"))


def run(args: argparse.Namespace) -> int:
    import warnings

    from sotjax import audit as A
    from sotjax import pipeline, rundir
    from sotjax.commands.weigh import text_options
    from sotjax.conditioning import Conditioner, ConditioningConfig
    from sotjax.errors import SotjaxWarning

    A.check_options(args.threshold, args.top_k, args.block_rows, args.backend)
    conditioning = ConditioningConfig.parse(args.conditioning)
    text = text_options(args)
    cache_dir = args.cache_dir
    inputs = [args.corpus, args.safe, args.harmful, args.ids, cache_dir]
    rundir.check_output_dir(args.out, inputs, kind="audit")
    progress = not args.no_progress
    sets: dict[str, Any] = {}
    ids: dict[str, object] = {}
    provenance: dict[str, object] = {}
    for name, path, id_path in (("corpus", args.corpus, args.ids), ("safe", args.safe, None),
                                ("harmful", args.harmful, None)):
        if path is None:
            continue
        sets[name], ids[name], provenance[name] = pipeline.read_set(path, id_path, text, progress)
    if args.ids is not None:
        from sotjax import io

        provenance["ids"] = {"path": str(args.ids), "sha256": io.file_sha256(args.ids)}
    names = {name: str(path) for name, path in (("corpus", args.corpus), ("safe", args.safe),
                                                 ("harmful", args.harmful)) if path is not None}
    if not conditioning.is_identity:  # the geometry weigh's cost sees (sotjax.learn.fit_conditioner)
        from sotjax.learn import validate_inputs

        validate_inputs(sets["corpus"], sets.get("safe"), sets.get("harmful"), names)  # bad input named first
        fitted = Conditioner.fit_problem(conditioning, sets["corpus"], sets.get("safe"), sets.get("harmful"))
        sets = {k: fitted.apply(v) for k, v in sets.items()}
    result = A.audit(sets["corpus"], sets.get("safe"), sets.get("harmful"), threshold=args.threshold,
                     top_k=args.top_k, block_rows=args.block_rows, backend=args.backend, names=names)
    summary = {**result.summary(), "conditioning": conditioning.spec, "inputs": provenance, "command": list(sys.argv),
               "versions": pipeline.versions()}
    with rundir.writing_run(args.out, "audit", inputs) as writer:
        writer.write_links(A.links_table(result, ids))
        writer.write_audit_summary(summary)
        writer.write_audit_html(A.summary_html(summary))
    print(f"sotjax audit: {A.describe(summary)}\n  wrote {args.out}/{rundir.LINKS}, {rundir.AUDIT_SUMMARY}, "
          f"{rundir.AUDIT_HTML} ({result.timings['total']:.2f} s)")
    for line in result.warnings:
        warnings.warn(line, SotjaxWarning, stacklevel=2)
    return 0
