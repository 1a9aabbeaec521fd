"""``sotjax export``: a run's kept rows with a ``weight`` column, for trainers outside sotjax.

Writes every field of the kept rows of ``--data`` plus ``weight`` (the run's ``train_weight``: mean
1 over the kept rows; use it as a per-sample loss multiplier), as JSONL or Parquet, in input order
or ``--ranked`` (highest weight first). The file is written atomically; bad input is one line,
exit 2, nothing written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write a run's kept rows with a weight column (JSONL/Parquet) for TRL, HF Trainer, Axolotl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, type=Path, help="a run directory (sotjax weigh or demo)")
    p.add_argument("--data", required=True, type=Path, help="the corpus the run weighed")
    p.add_argument("--out", required=True, type=Path, help="output file, .jsonl or .parquet")
    p.add_argument("--ranked", action="store_true", help="highest weight first (default: input order)")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--response-field", default="response")
    p.add_argument("--id-field", default="id")


def run(args: argparse.Namespace) -> int:
    from sotjax.errors import SotjaxInputError
    from sotjax.finetune.export import EXPORT_SUFFIXES, export_rows
    from sotjax.rundir import read_run

    out: Path = args.out
    if out.suffix.lower() not in EXPORT_SUFFIXES:
        raise SotjaxInputError(f"--out {out}: choose a .jsonl or .parquet file name")
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise SotjaxInputError(f"--out {out}: exists and is not a regular file")
    resolved = out.resolve()
    if Path(args.data).exists() and resolved == Path(args.data).resolve():
        raise SotjaxInputError(f"--out {out}: is the --data file; give a new path")
    run_path = Path(args.run).resolve()
    if run_path == resolved.parent or run_path in resolved.parents:
        raise SotjaxInputError(f"--out {out}: is inside the run directory; sotjax writes there only its own files")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SotjaxInputError(f"--out {out}: cannot be created ({parent} is not a directory)")
    run_dir = read_run(args.run)
    n = export_rows(run_dir, args.data, out, ranked=args.ranked, prompt_field=args.prompt_field,
                    response_field=args.response_field, id_field=args.id_field)
    print(f"sotjax export: wrote {n} kept rows with a weight column to {out}")
    return 0
