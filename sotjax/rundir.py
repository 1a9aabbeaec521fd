"""Run directories: the one owner of where sotjax writes a run, and of proving a directory is its own.

A run directory (``sotjax weigh``, ``sotjax demo``) is written atomically (a staging directory
renamed into place, :mod:`sotjax.atomic`) and carries a marker file :data:`MARKER` that sotjax
writes itself::

    {"format": "sotjax-run", "version": 1, "kind": "weigh", "files": ["config.json", ...]}

An existing ``--out`` is replaced only when sotjax can prove it wrote it: the marker is present
and valid, and the directory holds nothing but the files the marker lists (plus the files that
``sotjax eval`` adds, :data:`ADDED_LATER`). Anything else — a user's folder that happens to hold a
``stats.json``, a directory with the inputs in it, a subdirectory — is refused with one line and
left untouched. The current directory, any of its ancestors, and any directory that holds an input
are never replaced, whatever they contain.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sotjax.atomic import OWNER_FILE, atomic_directory
from sotjax.errors import SotjaxInputError, SotjaxRuntimeError

MARKER = ".sotjax-run"
FORMAT = "sotjax-run"
FORMAT_VERSION = 1
KINDS = ("weigh", "demo")
#: files ``sotjax eval`` writes into an existing run directory (not listed in the marker)
ADDED_LATER = ("eval.json", "eval.md")
#: the marker is read only up to this size (a marker sotjax wrote is a few hundred bytes)
_MARKER_MAX_BYTES = 1 << 16


def read_marker(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed marker of ``run_dir``, or None when it is missing or not one sotjax wrote."""
    path = Path(run_dir) / MARKER
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > _MARKER_MAX_BYTES:
            return None
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not (isinstance(marker, dict) and marker.get("format") == FORMAT
            and isinstance(marker.get("version"), int) and isinstance(marker.get("files"), list)
            and all(isinstance(f, str) for f in marker["files"])):
        return None
    return marker


def is_run_dir(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` is a directory sotjax wrote and nothing else has been put into."""
    return _foreign_reason(Path(run_dir)) is None


def _foreign_reason(run_dir: Path) -> str | None:
    marker = read_marker(run_dir)
    if marker is None:
        return f"has no valid {MARKER} marker"
    if marker["version"] > FORMAT_VERSION:
        return f"was written by a newer sotjax (run format {marker['version']} > {FORMAT_VERSION})"
    allowed = {MARKER, *marker["files"], *ADDED_LATER}
    try:
        entries = list(os.scandir(run_dir))
    except OSError as err:
        return f"cannot be listed ({err.strerror})"
    for entry in entries:
        if entry.name not in allowed:
            return f"holds {entry.name!r}, which sotjax did not write there"
        if entry.is_dir(follow_symlinks=False) or entry.is_symlink():
            return f"holds {entry.name!r}, which is not a plain file"
    return None


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def check_output_dir(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Refuse an ``--out`` that sotjax may not replace (one line naming it); call before any work.

    Allowed: a path that does not exist yet (its parent writable), an empty directory, or a run
    directory sotjax wrote (see the module docstring). Refused: a file; the current directory or
    an ancestor of it; a directory holding (at any depth) one of ``inputs``; a non-empty directory
    that is not provably sotjax's own.
    """
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
        if item is None:
            continue
        if _is_within(Path(item).resolve(), resolved):
            raise SotjaxInputError(f"{where}: contains the input {item}; give a new path for the output")
    if out.exists():
        if not out.is_dir():
            raise SotjaxInputError(f"{where}: exists and is not a directory")
        try:
            empty = not any(os.scandir(out))
        except OSError as err:
            raise SotjaxInputError(f"{where}: cannot be listed ({err.strerror})") from None
        if not empty:
            reason = _foreign_reason(out)
            if reason is not None:
                raise SotjaxInputError(
                    f"{where}: exists and is not a sotjax run directory (it {reason}); "
                    "sotjax never replaces a directory it did not write: choose another --out")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SotjaxInputError(f"{where}: cannot be created ({parent} is not a writable directory)")


def marker_text(kind: str, files: Iterable[str]) -> str:
    """The content of :data:`MARKER` for a run of ``kind`` holding ``files``."""
    if kind not in KINDS:
        raise ValueError(f"unknown run kind {kind!r}")
    body = {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind, "files": sorted(files)}
    return json.dumps(body, indent=2) + "\n"


@contextlib.contextmanager
def writing_run(out_dir: str | os.PathLike, kind: str,
                inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """Yield a staging directory to fill; on success it becomes ``out_dir`` with its marker.

    The output is checked again just before the swap (it may have changed during a long job). A
    failure while writing (disk full, permissions) raises :class:`SotjaxRuntimeError` naming
    ``out_dir``; the staging directory is removed and an earlier run at ``out_dir`` survives intact.
    """
    inputs = list(inputs)
    check_output_dir(out_dir, inputs)
    out = Path(out_dir)
    try:
        with atomic_directory(out) as staging:
            yield staging
            files = [entry.name for entry in os.scandir(staging) if entry.name != OWNER_FILE]
            (staging / MARKER).write_text(marker_text(kind, files), encoding="utf-8")
            check_output_dir(out, inputs)
    except OSError as err:
        what = err.strerror or type(err).__name__
        raise SotjaxRuntimeError(f"{out}: cannot write the run directory ({what}); nothing was written"
                                 + ("" if not out.exists() else ", the earlier run there is unchanged")) from None


def write_run(
    out_dir: str | os.PathLike,
    ids: Any,
    weights: Any,
    logits: Any,
    selection: Any,
    config: dict[str, Any],
    stats: dict[str, Any],
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a ``sotjax weigh`` run directory atomically: it appears complete, or not at all.

    Files: ``weights.parquet`` (id, weight, logit, rank, selected, train_weight),
    ``selected_ids.npy`` (kept ids, best first, as unicode strings), ``config.json``, ``stats.json``,
    ``extra_files`` (name -> bytes) and the marker.
    """
    from sotjax.io import dumps_json, write_weights

    with writing_run(out_dir, "weigh", inputs) as staging:
        write_weights(staging / "weights.parquet", ids, weights, logits, selection)
        (staging / "config.json").write_text(dumps_json(config), encoding="utf-8")
        (staging / "stats.json").write_text(dumps_json(stats), encoding="utf-8")
        for name, data in (extra_files or {}).items():
            (staging / name).write_bytes(data)
    return Path(out_dir)
