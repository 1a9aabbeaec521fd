"""Atomic outputs: a file or a whole directory appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes 0600
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


OWNER_FILE = ".sotjax-owner"  # inside a staging/old directory: the pid of the process that made it


def _write_owner(directory: Path) -> None:
    (directory / OWNER_FILE).write_text(f"{os.getpid()}\n", encoding="ascii")


def _owner_alive(directory: Path) -> bool:
    """Whether the process that made ``directory`` (per its owner file) may still be running."""
    try:
        pid = int((directory / OWNER_FILE).read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clean_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove what an interrupted :func:`atomic_directory` for ``path`` left beside it.

    Only directories named ``.{name}.*.staging`` / ``.{name}.*.old`` that carry an owner file
    naming a process that no longer runs are touched (a concurrent writer's are left alone). An
    ``.old`` holding the previous content of ``path`` while ``path`` itself is missing (a crash
    between the two renames) is restored rather than deleted. Returns what was removed.
    """
    path = Path(path)
    removed: list[Path] = []
    try:
        siblings = sorted(path.parent.glob(f".{glob_escape(path.name)}.*"))
    except OSError:
        return removed
    for leftover in siblings:
        if not leftover.name.endswith((".staging", ".old")) or leftover.is_symlink() or not leftover.is_dir():
            continue
        if not (leftover / OWNER_FILE).is_file() or _owner_alive(leftover):
            continue
        content = leftover / "content"
        if leftover.name.endswith(".old") and content.is_dir() and not path.exists():
            os.replace(content, path)
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped (for :meth:`Path.glob`)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh staging directory; it replaces ``path`` only if the block succeeds.

    An existing ``path`` is replaced as a whole (renamed aside, the staging directory renamed in,
    the old content removed), so a reader never sees a half-written directory. On failure (an
    exception, including KeyboardInterrupt) the staging directory is deleted and ``path`` is left
    as it was. Leftovers of an earlier process killed mid-write are cleaned first
    (:func:`clean_leftovers`). The caller decides whether ``path`` may be replaced at all
    (:func:`sotjax.rundir.check_output_dir`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".staging", dir=path.parent))
    old: Path | None = None
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a run directory is an ordinary one
        _write_owner(staging)
        yield staging
        (staging / OWNER_FILE).unlink()
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            _write_owner(old)
            os.replace(path, old / "content")
            os.replace(staging, path)
        else:
            os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            if (old / "content").exists() and not path.exists():  # the second rename failed: put it back
                os.replace(old / "content", path)
            shutil.rmtree(old, ignore_errors=True)
