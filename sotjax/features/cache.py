"""On-disk embedding cache: resumable, chunked, self-checking.

Layout: ``<cache_dir>/<namespace>/`` where ``namespace = sha256(json(meta))[:20]`` and ``meta`` holds
everything that changes a vector (model fingerprint, template, max_length, truncation side, layer,
compute dtype, cache format version); ``meta.json`` stores it readably. A text's key is the SHA-256 of
the exact string that is embedded (after templating). Vectors are written in chunks
``chunk-<digest>.npz`` (arrays ``keys`` (k,) bytes and ``emb`` (k, d) float32) as soon as
``chunk_rows`` are pending, each atomically (temp file + rename), so an interrupted run loses at most
one chunk and a re-run only computes what is missing. ``digest = sha256(keys ‖ emb)[:32]`` is
recomputed on load: a chunk that fails to parse or to match is reported, deleted and its texts
recomputed. A chunk that is not a regular file (a FIFO, a device, a link to one) or is larger than
:data:`MAX_CHUNK_BYTES` (as stored or once unpacked) is treated as damaged without being read.

Errors are one line: a ``cache_dir`` that is not a directory is bad input
(:class:`~sotjax.errors.SotjaxInputError`); a cache that cannot be created or written (disk full,
permissions) is a :class:`~sotjax.errors.SotjaxRuntimeError` naming the path. A failed chunk write
leaves no partial file (the temporary file is removed) and no earlier chunk is touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from sotjax.atomic import write_bytes_atomic
from sotjax.errors import SotjaxInputError, SotjaxRuntimeError

CACHE_FORMAT = 1
#: largest cache chunk read back (bytes, on disk and unpacked); a bigger one is treated as damaged
MAX_CHUNK_BYTES = 1 << 30


def text_key(text: str) -> str:
    """SHA-256 hex digest of the UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _digest(keys: np.ndarray, emb: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(keys).tobytes())
    h.update(np.ascontiguousarray(emb, dtype=np.float32).tobytes())
    return h.hexdigest()[:32]


class EmbeddingCache:
    """Chunked store of ``key -> float32 vector`` for one feature configuration."""

    def __init__(self, root: str | os.PathLike, meta: dict[str, Any], dim: int, chunk_rows: int = 256):
        meta = {**meta, "cache_format": CACHE_FORMAT, "dim": int(dim)}
        blob = json.dumps(meta, sort_keys=True, default=str)
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise SotjaxInputError(f"{root}: the embedding cache directory exists and is not a directory")
        self.directory = root / hashlib.sha256(blob.encode()).hexdigest()[:20]
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SotjaxRuntimeError(_cannot(err, self.directory, "create the embedding cache")) from None
        meta_file = self.directory / "meta.json"
        if not meta_file.is_file():
            self._write(meta_file, (json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n").encode())
        self.dim = int(dim)
        self.chunk_rows = int(chunk_rows)
        self._pending_keys: list[str] = []
        self._pending_vecs: list[np.ndarray] = []
        self.n_corrupt = 0

    def load(self) -> dict[str, np.ndarray]:
        """Every valid cached vector; corrupted chunks are deleted (and counted in ``n_corrupt``)."""
        found: dict[str, np.ndarray] = {}
        for chunk in sorted(self.directory.glob("chunk-*.npz")):
            try:
                ok = _small_regular_npz(chunk)
                if ok:
                    with np.load(chunk, allow_pickle=False) as z:
                        keys, emb = z["keys"], z["emb"]
                    ok = (
                        emb.dtype == np.float32 and emb.ndim == 2 and emb.shape == (keys.shape[0], self.dim)
                        and chunk.stem == f"chunk-{_digest(keys, emb)}"
                    )
            except Exception:  # zip/npy parse errors of a damaged file
                ok = False
            if not ok:
                self.n_corrupt += 1
                warnings.warn(f"embedding cache: {chunk} is corrupted; deleting it and recomputing its texts",
                              stacklevel=2)
                with contextlib.suppress(OSError):
                    chunk.unlink(missing_ok=True)
                continue
            for k, v in zip(keys.astype(str), emb, strict=True):
                found[k] = v
        return found

    def add(self, keys: list[str], vectors: np.ndarray) -> None:
        """Queue vectors; a chunk is written once ``chunk_rows`` are pending."""
        self._pending_keys.extend(keys)
        self._pending_vecs.append(np.asarray(vectors, dtype=np.float32))
        if len(self._pending_keys) >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        """Write all pending vectors as one chunk (atomically)."""
        if not self._pending_keys:
            return
        keys = np.array(self._pending_keys, dtype="S64")
        emb = np.concatenate(self._pending_vecs, axis=0)
        buf = io.BytesIO()
        np.savez(buf, keys=keys, emb=emb)
        self._write(self.directory / f"chunk-{_digest(keys, emb)}.npz", buf.getvalue())
        self._pending_keys, self._pending_vecs = [], []

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        """Write ``path`` atomically; a failure is one :class:`SotjaxRuntimeError` line naming it."""
        try:
            write_bytes_atomic(path, data)
        except OSError as err:
            raise SotjaxRuntimeError(_cannot(err, path, "write the embedding cache")) from None


def _cannot(err: OSError, path: Path, what: str) -> str:
    reason = err.strerror or type(err).__name__
    return f"{path}: cannot {what} ({reason})"


def _small_regular_npz(path: Path) -> bool:
    """Whether ``path`` is a regular file whose size, stored and unpacked, is below :data:`MAX_CHUNK_BYTES`."""
    import stat
    import zipfile

    info = path.stat()  # follows a link: a link to a FIFO or a device is refused too
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_CHUNK_BYTES:
        return False
    with zipfile.ZipFile(path) as archive:
        return sum(member.file_size for member in archive.infolist()) <= MAX_CHUNK_BYTES
