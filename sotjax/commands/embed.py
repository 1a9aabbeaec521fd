"""``sotjax embed``: text records -> feature matrix ``OUT.npy`` + ids ``OUT.ids.npy`` (+ ``OUT.meta.json``).

``--out`` is checked before any work (one line, exit 2): it must name a file, not a directory
(``--out results/`` → give ``results/features.npy``); none of the three outputs may be a
directory or a non-regular file, nor the ``--input`` file itself; missing parent directories are
created, but the nearest existing ancestor must be a writable directory.

The three outputs are written to temporary files beside their targets and renamed into place only
once all three are complete, so a failure (disk full, permission denied) leaves no partial file and
any earlier outputs at those paths unchanged; it is one line naming the path, exit 1.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HELP = "embed text records (prompt/response pairs or single texts) into feature vectors (.npy + ids)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True,
                        help="JSONL / JSON / Parquet / CSV file or a saved HF dataset dir")
    parser.add_argument("--out", required=True, help="output .npy path; ids go to <stem>.ids.npy beside it")
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (default, last-token state, d=576), minilm (d=384), "
                             "a .gguf file or an HF checkpoint dir")
    parser.add_argument("--prompt-field", default="prompt", help="prompt column (pair mode) [prompt]")
    parser.add_argument("--response-field", default="response", help="response column (pair mode) [response]")
    parser.add_argument("--text-field", default="text",
                        help="single-text column, used when there is no prompt column [text]")
    parser.add_argument("--id-field", default="id", help="id column; row numbers when absent [id]")
    parser.add_argument("--split", default=None, help="split of a DatasetDict directory [train]")
    parser.add_argument("--template", default="human_assistant", choices=["human_assistant", "chat"],
                        help="'Human: {prompt}\\nAssistant: {response}' (default) or the model's chat template")
    parser.add_argument("--max-length", type=int, default=256, help="tokens kept per text [256]")
    parser.add_argument("--truncation-side", default="right", choices=["right", "left"],
                        help="cut the end (right, default) or the beginning (left) of long texts")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass [32]")
    parser.add_argument("--layer", type=int, default=-1,
                        help="hidden-state layer, HF indexing; -1 = last (after final norm)")
    parser.add_argument("--pooling", default="auto", choices=["auto", "last", "mean"],
                        help="token states -> one vector: last token or masked mean [auto: last for decoders "
                             "(the paper's feature), mean for encoders]")
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of weights/activations [float32]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                        help="dtype stored in OUT.npy [float32]")
    parser.add_argument("--cache-dir", default=None, help="on-disk embedding cache (resumable; re-runs are free)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def output_paths(out: str) -> tuple[Path, Path, Path]:
    """``OUT.npy`` -> (OUT.npy, OUT.ids.npy, OUT.meta.json); a missing ``.npy`` suffix is added."""
    path = Path(out)
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    stem = path.with_suffix("")
    return path, stem.with_name(stem.name + ".ids.npy"), stem.with_name(stem.name + ".meta.json")


def check_outputs(out: str, input_path: str | None = None) -> tuple[Path, Path, Path]:
    """The three output paths of ``--out``, or one :class:`SotjaxInputError` line saying why not.

    See the module docstring for what is refused.
    """
    from sotjax.errors import SotjaxInputError

    where = f"--out {out}"
    if not out or not out.strip():
        raise SotjaxInputError("--out: give an output file path such as features.npy")
    if out.endswith(("/", os.sep)) or Path(out).is_dir():
        raise SotjaxInputError(f"{where}: names a directory; give a file path such as {Path(out) / 'features.npy'}")
    if "\0" in out:
        raise SotjaxInputError(f"{where}: contains a NUL byte")
    paths = output_paths(out)
    source = Path(input_path) if input_path else None
    for target in paths:
        if target.is_dir():
            raise SotjaxInputError(f"{where}: {target} is a directory; give another output path")
        if target.exists() and not target.is_file():
            raise SotjaxInputError(f"{where}: {target} exists and is not a regular file")
        if source is not None and target.exists() and source.exists() and os.path.samefile(target, source):
            raise SotjaxInputError(f"{where}: {target} is the input file; give another output path")
    ancestor = paths[0].absolute().parent
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise SotjaxInputError(f"{where}: cannot be created ({ancestor} is not a writable directory)")
    return paths


def write_outputs(files: dict[Path, bytes]) -> None:
    """Write every ``path: data`` so that all appear together, or none (see the module docstring)."""
    import contextlib

    from sotjax.atomic import atomic_path
    from sotjax.errors import SotjaxRuntimeError

    existed = any(p.exists() for p in files)
    current = next(iter(files))
    try:
        with contextlib.ExitStack() as stack:
            staged = []
            for path, data in files.items():
                current = path
                staged.append((stack.enter_context(atomic_path(path)), data))
            for (tmp, data), path in zip(staged, files, strict=True):
                current = path
                tmp.write_bytes(data)
            current = next(iter(files))  # the renames happen as the stack unwinds
    except OSError as err:
        what = err.strerror or type(err).__name__
        kept = "; the earlier output there is unchanged" if existed else ""
        raise SotjaxRuntimeError(f"{current}: cannot write the output ({what}); nothing was written{kept}") from None


def run(args: argparse.Namespace) -> int:
    import io
    import json
    import sys

    import numpy as np

    from sotjax.errors import SotjaxInputError
    from sotjax.features import FeatureConfig, embed_texts_report, read_text_records

    try:
        config = FeatureConfig(
            model=args.model, template=args.template, max_length=args.max_length, batch_size=args.batch_size,
            dtype=args.compute_dtype, layer=args.layer, pooling=args.pooling, cache_dir=args.cache_dir,
            truncation_side=args.truncation_side,
        )
    except ValueError as err:
        raise SotjaxInputError(f"invalid option: {err}") from None
    out, ids_out, meta_out = check_outputs(args.out, args.input)
    if args.cache_dir is not None and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        raise SotjaxInputError(f"--cache-dir {args.cache_dir}: exists and is not a directory")
    records = read_text_records(args.input, prompt_field=args.prompt_field, response_field=args.response_field,
                                id_field=args.id_field, text_field=args.text_field, split=args.split)
    emb, report = embed_texts_report(records.prompts, records.responses, config, progress=not args.no_progress)

    def npy_bytes(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        return buf.getvalue()

    meta = {
        "input": str(args.input), "n": int(emb.shape[0]), "dim": int(emb.shape[1]), "dtype": args.dtype,
        "mode": "pairs" if records.responses is not None else "texts",
        "model": report.model, "model_fingerprint": report.fingerprint, "template": args.template,
        "max_length": args.max_length, "truncation_side": args.truncation_side, "layer": args.layer,
        "pooling": report.pooling,
        "compute_dtype": args.compute_dtype, "n_truncated": report.n_truncated, "n_cached": report.n_cached,
        "texts_per_second": None if report.n_computed == 0 else round(report.texts_per_second, 2),
        "compile_seconds": round(report.compile_seconds, 3),
    }
    write_outputs({
        out: npy_bytes(emb.astype(args.dtype)),
        ids_out: npy_bytes(np.array(records.ids, dtype=str)),
        meta_out: (json.dumps(meta, indent=2) + "\n").encode("utf-8"),
    })
    print(f"wrote {out} ({emb.shape[0]}x{emb.shape[1]} {args.dtype}), {ids_out}, {meta_out}", file=sys.stderr)
    return 0
