"""``sotjax embed``: text records -> feature matrix ``OUT.npy`` + ids ``OUT.ids.npy`` (+ ``OUT.meta.json``)."""

from __future__ import annotations

import argparse

HELP = "embed text records (prompt/response pairs or single texts) into feature vectors (.npy + ids)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="JSONL / JSON / Parquet / CSV file or a saved HF dataset dir")
    parser.add_argument("--out", required=True, help="output .npy path; ids go to <stem>.ids.npy beside it")
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (default, last-token state, d=576), minilm (d=384), a .gguf file or an HF checkpoint dir")
    parser.add_argument("--prompt-field", default="prompt", help="prompt column (pair mode) [prompt]")
    parser.add_argument("--response-field", default="response", help="response column (pair mode) [response]")
    parser.add_argument("--text-field", default="text", help="single-text column, used when there is no prompt column [text]")
    parser.add_argument("--id-field", default="id", help="id column; row numbers when absent [id]")
    parser.add_argument("--split", default=None, help="split of a DatasetDict directory [train]")
    parser.add_argument("--template", default="human_assistant", choices=["human_assistant", "chat"],
                        help="'Human: {prompt}\\nAssistant: {response}' (default) or the model's chat template")
    parser.add_argument("--max-length", type=int, default=256, help="tokens kept per text [256]")
    parser.add_argument("--truncation-side", default="right", choices=["right", "left"],
                        help="cut the end (right, default) or the beginning (left) of long texts")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass [32]")
    parser.add_argument("--layer", type=int, default=-1, help="hidden-state layer, HF indexing; -1 = last (after final norm)")
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of weights/activations [float32]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="dtype stored in OUT.npy [float32]")
    parser.add_argument("--cache-dir", default=None, help="on-disk embedding cache (resumable; re-runs are free)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def output_paths(out: str):
    """``OUT.npy`` -> (OUT.npy, OUT.ids.npy, OUT.meta.json); a missing ``.npy`` suffix is added."""
    from pathlib import Path

    path = Path(out)
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    stem = path.with_suffix("")
    return path, stem.with_name(stem.name + ".ids.npy"), stem.with_name(stem.name + ".meta.json")


def run(args: argparse.Namespace) -> int:
    import io
    import json
    import sys

    import numpy as np

    from sotjax.atomic import write_bytes_atomic, write_text_atomic
    from sotjax.errors import SotjaxInputError
    from sotjax.features import FeatureConfig, embed_texts_report, read_text_records

    try:
        config = FeatureConfig(
            model=args.model, template=args.template, max_length=args.max_length, batch_size=args.batch_size,
            dtype=args.compute_dtype, layer=args.layer, cache_dir=args.cache_dir, truncation_side=args.truncation_side,
        )
    except ValueError as err:
        raise SotjaxInputError(f"invalid option: {err}") from None
    records = read_text_records(args.input, prompt_field=args.prompt_field, response_field=args.response_field,
                                id_field=args.id_field, text_field=args.text_field, split=args.split)
    emb, report = embed_texts_report(records.prompts, records.responses, config, progress=not args.no_progress)
    out, ids_out, meta_out = output_paths(args.out)

    def npy_bytes(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        return buf.getvalue()

    write_bytes_atomic(out, npy_bytes(emb.astype(args.dtype)))
    write_bytes_atomic(ids_out, npy_bytes(np.array(records.ids, dtype=str)))
    meta = {
        "input": str(args.input), "n": int(emb.shape[0]), "dim": int(emb.shape[1]), "dtype": args.dtype,
        "mode": "pairs" if records.responses is not None else "texts",
        "model": report.model, "model_fingerprint": report.fingerprint, "template": args.template,
        "max_length": args.max_length, "truncation_side": args.truncation_side, "layer": args.layer,
        "compute_dtype": args.compute_dtype, "n_truncated": report.n_truncated, "n_cached": report.n_cached,
        "texts_per_second": None if report.n_computed == 0 else round(report.texts_per_second, 2),
        "compile_seconds": round(report.compile_seconds, 3),
    }
    write_text_atomic(meta_out, json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out} ({emb.shape[0]}x{emb.shape[1]} {args.dtype}), {ids_out}, {meta_out}", file=sys.stderr)
    return 0
