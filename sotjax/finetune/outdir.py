"""The fine-tune output directory (kind ``finetune``) and its marker, kept apart from :mod:`sotjax.rundir`.

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

:func:`sotjax.rundir.parse_marker` does not know this kind yet (it accepts ``weigh``/``demo``
and plain file names only), so this module validates fine-tune markers itself
(:func:`finetune_foreign_reason`) and :func:`check_finetune_out` applies the same rules as
:func:`sotjax.rundir.check_output_dir`: a new path, an empty directory, or a fine-tune directory
that sotjax wrote and nothing else was put into may be replaced; the current directory, its
ancestors, a directory holding an input and anything else are refused with one line.

Checkpoints of a running fine-tune live beside the output, in ``.<name>.finetune-ckpt/`` (a
hidden sibling, so the output itself stays atomic); it is removed after a successful run and
reused by ``--resume``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sotjax.atomic import OWNER_FILE, atomic_directory
from sotjax.errors import SotjaxInputError, SotjaxRuntimeError, shorten
from sotjax.rundir import FORMAT, FORMAT_VERSION, MARKER, SCHEMA

KIND = "finetune"
REQUIRED = ("config.json", "stats.json", "adapter/adapter_model.safetensors", "adapter/adapter_config.json")
_MARKER_MAX_BYTES = 1 << 20


def checkpoint_dir(out: str | os.PathLike) -> Path:
    """Where the checkpoints of a fine-tune writing ``out`` live (a hidden sibling of ``out``)."""
    out = Path(out)
    return out.parent / f".{out.name}.finetune-ckpt"


def finetune_marker_text(files: Iterable[str]) -> str:
    body = {"format": FORMAT, "version": FORMAT_VERSION, "schema": SCHEMA, "kind": KIND, "files": sorted(files)}
    return json.dumps(body, indent=2) + "\n"


def _tree(directory: Path) -> tuple[list[str], str | None]:
    """Relative paths of the regular files under ``directory``, or a reason it is not a plain tree."""
    files: list[str] = []
    for root, dirs, names in os.walk(directory, followlinks=False):
        for name in dirs + names:
            p = Path(root) / name
            rel = p.relative_to(directory).as_posix()
            if p.is_symlink():
                return files, f"holds {rel!r}, a symbolic link"
            if name in names:
                if not p.is_file():
                    return files, f"holds {rel!r}, which is not a plain file"
                files.append(rel)
    return files, None


def finetune_foreign_reason(directory: Path) -> str | None:
    """None when ``directory`` is a fine-tune directory sotjax wrote, untouched since; else why not."""
    path = directory / MARKER
    if not path.is_file() or path.is_symlink():
        return f"has no valid {MARKER} marker"
    try:
        if path.stat().st_size > _MARKER_MAX_BYTES:
            return f"has an invalid {MARKER} marker (too large)"
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return f"has an invalid {MARKER} marker (not JSON)"
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or marker.get("kind") != KIND:
        return f"has a {MARKER} marker that is not a fine-tune's"
    files = marker.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return f"has an invalid {MARKER} marker (field 'files')"
    present, reason = _tree(directory)
    if reason is not None:
        return reason
    extra = sorted(set(present) - {MARKER, *files})
    if extra:
        return f"holds {extra[0]!r}, which sotjax did not write there"
    return None


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def check_finetune_out(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Refuse an ``--out`` that sotjax may not replace (one line); see the module docstring."""
    out = Path(out_dir)
    where = f"--out {out}"
    if out.is_symlink():
        raise SotjaxInputError(f"{where}: is a symbolic link; give the real directory or a new path")
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if _is_within(cwd, resolved):
        what = "the current directory" if resolved == cwd else "a parent of the current directory"
        raise SotjaxInputError(f"{where}: is {what}; sotjax replaces its output directory, give a new path")
    for item in inputs:
        if item is not None and _is_within(Path(item).resolve(), resolved):
            raise SotjaxInputError(f"{where}: contains the input {item}; give a new path for the output")
    if out.exists():
        if not out.is_dir():
            raise SotjaxInputError(f"{where}: exists and is not a directory")
        try:
            empty = not any(os.scandir(out))
        except OSError as err:
            raise SotjaxInputError(f"{where}: cannot be listed ({err.strerror})") from None
        if not empty:
            reason = finetune_foreign_reason(out)
            if reason is not None:
                raise SotjaxInputError(f"{where}: exists and is not a sotjax fine-tune directory (it {reason}); "
                                       "sotjax never replaces a directory it did not write: choose another --out")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SotjaxInputError(f"{where}: cannot be created ({parent} is not a writable directory)")


@contextlib.contextmanager
def writing_finetune(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """Yield a staging directory; on success it becomes ``out_dir`` with its marker (atomically)."""
    inputs = list(inputs)
    check_finetune_out(out_dir, inputs)
    out = Path(out_dir)
    try:
        with atomic_directory(out) as staging:
            yield staging
            files, reason = _tree(staging)
            files = [f for f in files if f != OWNER_FILE]
            missing = [f for f in REQUIRED if f not in files]
            if reason is not None or missing:
                raise ValueError(f"a fine-tune directory must hold {', '.join(REQUIRED)}: missing {missing} {reason}")
            (staging / MARKER).write_text(finetune_marker_text(files), encoding="utf-8")
            check_finetune_out(out, inputs)
    except OSError as err:
        what = err.strerror or type(err).__name__
        raise SotjaxRuntimeError(f"{out}: cannot write the fine-tune directory ({what}); nothing was written"
                                 + ("" if not out.exists() else ", the earlier one there is unchanged")) from None


def describe_marker(directory: Path) -> dict[str, Any]:
    """The marker of a fine-tune directory (after :func:`finetune_foreign_reason` said it is one)."""
    reason = finetune_foreign_reason(directory)
    if reason is not None:
        raise SotjaxInputError(f"{directory}: not a sotjax fine-tune directory (it {shorten(reason, 200)})")
    marker: dict[str, Any] = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    return marker
