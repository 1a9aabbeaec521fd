"""On-disk embedding cache: resumable, chunked, self-checking.

Layout: ``<cache_dir>/<namespace>/`` where ``namespace = sha256(json(meta))[:20]`` and ``meta`` holds
everything that changes a vector (model fingerprint, template, max_length, truncation side, layer,
compute dtype, cache format version); ``meta.json`` stores it readably. A text's key is the SHA-256 of
the exact string that is embedded (after templating). Vectors are written in chunks
``chunk-<digest>.npz`` (arrays ``keys`` (k,) bytes and ``emb`` (k, d) float32) as soon as
``chunk_rows`` are pending, each atomically (temp file + rename), so an interrupted run loses at most
one chunk and a re-run only computes what is missing. ``digest = sha256(keys ‖ emb)[:32]`` is
recomputed on load: a chunk that fails to parse or to match is reported, deleted and its texts
recomputed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from sotjax.atomic import write_bytes_atomic, write_text_atomic

CACHE_FORMAT = 1


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
        self.directory = Path(root) / hashlib.sha256(blob.encode()).hexdigest()[:20]
        self.directory.mkdir(parents=True, exist_ok=True)
        meta_file = self.directory / "meta.json"
        if not meta_file.is_file():
            write_text_atomic(meta_file, json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
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
                chunk.unlink(missing_ok=True)
                continue
            for k, v in zip(keys.astype(str), emb):
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
        write_bytes_atomic(self.directory / f"chunk-{_digest(keys, emb)}.npz", buf.getvalue())
        self._pending_keys, self._pending_vecs = [], []
