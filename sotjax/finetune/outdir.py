"""The fine-tune output directory (kind ``finetune`` of :mod:`sotjax.rundir`) and its checkpoints.

Layout of ``sotjax finetune --out DIR``::

    DIR/.sotjax-run                       the marker (below), written last
    DIR/config.json                       settings, inputs (paths, sha256), model fingerprint, versions
    DIR/stats.json                        losses per step, steps, tokens, timings, rows, truncation
    DIR/adapter/adapter_model.safetensors PEFT LoRA adapter (sotjax.finetune.export)
    DIR/adapter/adapter_config.json
    DIR/merged/model.safetensors          merged HF checkpoint (unless --no-merged)
    DIR/merged/config.json, tokenizer files

Marker (same file name and format as a run's, ``kind: "finetune"``, ``files`` listing relative
paths, sub-directories included)::

    {"format": "sotjax-run", "version": 2, "schema": "sotjax.run/2", "kind": "finetune",
     "files": ["adapter/adapter_config.json", ...]}

:mod:`sotjax.rundir` owns this kind (its files, the marker checks, when an ``--out`` may be
replaced); this module only names the rundir functions for a fine-tune: a new path, an empty
directory, or a fine-tune directory that sotjax wrote and nothing else was put into may be
replaced; the current directory, its ancestors, a directory holding an input, a weigh/demo run
and anything else are refused with one line.

Checkpoints of a running fine-tune live beside the output, in ``.<name>.finetune-ckpt/`` (a
hidden sibling, so the output itself stays atomic); it is removed after a successful run and
reused by ``--resume``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sotjax import rundir
from sotjax.errors import SotjaxInputError, shorten

KIND = "finetune"
REQUIRED = rundir.REQUIRED[KIND]


def checkpoint_dir(out: str | os.PathLike) -> Path:
    """Where the checkpoints of a fine-tune writing ``out`` live (a hidden sibling of ``out``)."""
    out = Path(out)
    return out.parent / f".{out.name}.finetune-ckpt"


def finetune_marker_text(files: Iterable[str]) -> str:
    """The marker of a fine-tune directory holding ``files`` (:func:`sotjax.rundir.marker_text`)."""
    return rundir.marker_text(KIND, files)


def finetune_foreign_reason(directory: Path) -> str | None:
    """None when ``directory`` is a fine-tune directory sotjax wrote, untouched since; else why not."""
    return rundir._foreign_reason(Path(directory), KIND)


def check_finetune_out(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Refuse an ``--out`` that sotjax may not replace (one line): :func:`sotjax.rundir.check_output_dir`."""
    rundir.check_output_dir(out_dir, inputs, KIND)


@contextlib.contextmanager
def writing_finetune(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """Yield a staging directory; on success it becomes ``out_dir`` with its marker (atomically).

    :func:`sotjax.rundir.writing_run` with kind ``finetune``: the staging directory must hold the
    :data:`REQUIRED` files and only files of the kind.
    """
    with rundir.writing_run(out_dir, KIND, inputs) as run:
        yield run.path


def describe_marker(directory: Path) -> dict[str, Any]:
    """The marker of a fine-tune directory sotjax wrote (one line otherwise)."""
    reason = finetune_foreign_reason(directory)
    if reason is not None:
        raise SotjaxInputError(f"{directory}: not a sotjax fine-tune directory (it {shorten(reason, 200)})")
    marker = rundir.parse_marker(directory)
    assert marker is not None
    return marker
