"""Reading embedding sets and writing run directories (the I/O edge of sotjax).

Inputs (one set per file):

* ``.npy`` — a float ``(n, d)`` array, memory-mapped. Ids come from an explicit ids file, else from
  ``<stem>.ids.npy`` beside it (what ``sotjax embed`` writes), else the row numbers ``0..n-1``.
* ``.jsonl`` — one JSON object per line with an ``embedding`` list and an optional ``id``.
* ``.parquet`` — an ``embedding`` list column and an optional ``id`` column.

Ids are kept as strings. Every problem is reported as one :class:`SotjaxInputError` line naming
the file, and the line/row or field.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from sotjax.atomic import atomic_directory
from sotjax.errors import SotjaxInputError

EMBEDDING_FIELD = "embedding"
ID_FIELD = "id"
EMBEDDING_SUFFIXES = (".npy", ".jsonl", ".parquet")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise SotjaxInputError(f"{path}: no such file")
    if not path.is_file():
        raise SotjaxInputError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise SotjaxInputError(f"{path}: not readable (permission denied)")


def _check_ids(ids: Sequence[str], path: Path) -> np.ndarray:
    ids = np.asarray([str(i) for i in ids], dtype=object)
    seen: dict[str, int] = {}
    for row, key in enumerate(ids):
        if key in seen:
            raise SotjaxInputError(f"{path}: duplicate id {key!r} (rows {seen[key]} and {row})")
        seen[key] = row
    return ids


def _read_npy(path: Path, ids_path: Path | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:  # numpy raises several types for bad files
        raise SotjaxInputError(f"{path}: not a readable .npy array ({type(err).__name__}: {err})") from None
    if x.ndim != 2:
        raise SotjaxInputError(f"{path}: expected a 2-D array (samples x dim), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise SotjaxInputError(f"{path}: expected a float array, got dtype {x.dtype}")
    if ids_path is None:
        beside = path.with_name(path.name[: -len(".npy")] + ".ids.npy")
        ids_path = beside if beside.exists() else None
    if ids_path is None:
        ids = [str(i) for i in range(x.shape[0])]
    else:
        ids = read_ids(ids_path)
        if len(ids) != x.shape[0]:
            raise SotjaxInputError(f"{ids_path}: {len(ids)} ids for {x.shape[0]} rows of {path}")
    return x, _check_ids(ids, ids_path or path)


def read_ids(path: str | os.PathLike) -> list[str]:
    """Ids from a ``.npy`` array, or a text file with one id per line."""
    path = Path(path)
    _check_file(path)
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as err:
            raise SotjaxInputError(f"{path}: not a readable .npy ids array ({err})") from None
        if arr.ndim != 1:
            raise SotjaxInputError(f"{path}: ids must be a 1-D array, got shape {arr.shape}")
        return [str(v) for v in arr.tolist()]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SotjaxInputError(f"{path}: cannot read ids ({err})") from None
    return [line.strip() for line in lines if line.strip()]


def _as_vector(value: Any, where: str, dim: int | None) -> list[float]:
    if not isinstance(value, list) or not value:
        raise SotjaxInputError(f"{where}: field '{EMBEDDING_FIELD}' must be a non-empty list of numbers")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SotjaxInputError(f"{where}: field '{EMBEDDING_FIELD}' must contain only numbers")
    if dim is not None and len(value) != dim:
        raise SotjaxInputError(f"{where}: '{EMBEDDING_FIELD}' has {len(value)} values, expected {dim}")
    return value


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each non-blank line of a JSONL file.

    One-line :class:`SotjaxInputError` for an unreadable file, non-UTF-8 text, a malformed line or
    a line that is not a JSON object (naming the file and line).
    """
    path = Path(path)
    try:
        handle = path.open("r", encoding="utf-8")
    except OSError as err:
        raise SotjaxInputError(f"{path}: cannot open ({err.strerror})") from None
    with handle:
        lineno = 0
        try:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SotjaxInputError(f"{path}: line {lineno}: malformed JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise SotjaxInputError(f"{path}: line {lineno}: expected a JSON object, got {type(record).__name__}")
                yield lineno, record
        except UnicodeDecodeError:
            raise SotjaxInputError(f"{path}: line {lineno + 1}: not UTF-8 text") from None


def _read_jsonl(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows: list[list[float]] = []
    ids: list[str] = []
    dim = None
    for lineno, record in iter_jsonl(path):
        where = f"{path}: line {lineno}"
        if EMBEDDING_FIELD not in record:
            raise SotjaxInputError(f"{where}: field '{EMBEDDING_FIELD}' is missing")
        vec = _as_vector(record[EMBEDDING_FIELD], where, dim)
        dim = len(vec)
        rows.append(vec)
        ids.append(str(record[ID_FIELD]) if ID_FIELD in record else str(len(ids)))
    x = np.asarray(rows, dtype=np.float32).reshape(len(rows), dim or 0)
    return x, _check_ids(ids, path)


def _read_parquet(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:
        raise SotjaxInputError(f"{path}: not a readable Parquet file ({type(err).__name__})") from None
    if EMBEDDING_FIELD not in table.column_names:
        raise SotjaxInputError(f"{path}: column '{EMBEDDING_FIELD}' is missing")
    col = table.column(EMBEDDING_FIELD).to_pylist()
    dim = None
    rows = []
    for row, value in enumerate(col):
        vec = _as_vector(value, f"{path}: row {row}", dim)
        dim = len(vec)
        rows.append(vec)
    x = np.asarray(rows, dtype=np.float32).reshape(len(rows), dim or 0)
    if ID_FIELD in table.column_names:
        ids = [str(v) for v in table.column(ID_FIELD).to_pylist()]
    else:
        ids = [str(i) for i in range(len(rows))]
    return x, _check_ids(ids, path)


def read_embeddings(path: str | os.PathLike, ids_path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one embedding set; returns ``(x, ids)`` with ``x`` of shape ``(n, d)``."""
    path = Path(path)
    _check_file(path)
    suffix = path.suffix.lower()
    if ids_path is not None and suffix != ".npy":
        raise SotjaxInputError(f"{ids_path}: an ids file is only used with a .npy input ({path} has its own ids)")
    if suffix == ".npy":
        return _read_npy(path, None if ids_path is None else Path(ids_path))
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise SotjaxInputError(f"{path}: unsupported file type '{suffix}' (expected {', '.join(EMBEDDING_SUFFIXES)})")


def holds_embeddings(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an embedding set (else it is read as text records).

    ``.npy`` always is; a ``.jsonl`` file is when its first record has an ``embedding`` field; a
    ``.parquet`` file when it has an ``embedding`` column. Anything else (CSV, JSON, a dataset
    directory, records without embeddings) is text.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        return False
    _check_file(path)
    if suffix == ".npy":
        return True
    if suffix == ".jsonl":
        try:
            with path.open("r", encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError:
                            return True  # let the embedding reader report the line
                        return isinstance(record, dict) and EMBEDDING_FIELD in record
        except (OSError, UnicodeDecodeError):
            return True  # the embedding reader reports it
        return True
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return EMBEDDING_FIELD in pq.read_schema(path).names
        except Exception:
            return True
    return False


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def to_jsonable(x: Any) -> Any:
    """Recursively convert NumPy values and dataclasses to JSON types; NaN/inf become None."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if hasattr(x, "__dataclass_fields__"):
        import dataclasses

        return to_jsonable(dataclasses.asdict(x))
    return x


def dumps_json(value: Any) -> str:
    return json.dumps(to_jsonable(value), indent=2, allow_nan=False) + "\n"


def weights_table(ids: Sequence[Any], weights: np.ndarray, logits: np.ndarray, selection) -> "pyarrow.Table":
    """The ``weights.parquet`` table: one row per corpus sample, in input order."""
    import pyarrow as pa

    return pa.table(
        {
            "id": pa.array([str(i) for i in ids], type=pa.string()),
            "weight": pa.array(np.asarray(weights, dtype=np.float64)),
            "logit": pa.array(np.asarray(logits, dtype=np.float64)),
            "rank": pa.array(np.asarray(selection.rank, dtype=np.int64)),
            "selected": pa.array(np.asarray(selection.selected, dtype=bool)),
            "train_weight": pa.array(np.asarray(selection.train_weight, dtype=np.float64)),
        }
    )


def write_weights(path: str | os.PathLike, ids: Sequence[Any], weights: np.ndarray, logits: np.ndarray,
                  selection) -> None:
    """Write ``weights.parquet`` (inside a staging directory) and ``selected_ids.npy`` beside it."""
    import pyarrow.parquet as pq

    path = Path(path)
    pq.write_table(weights_table(ids, weights, logits, selection), path)
    kept = np.asarray([str(i) for i in np.asarray(ids, dtype=object)[selection.selected_indices]], dtype=str)
    buffer = io.BytesIO()
    np.save(buffer, kept, allow_pickle=False)
    (path.parent / "selected_ids.npy").write_bytes(buffer.getvalue())


RUN_MARKER = "stats.json"


def check_output_dir(out_dir: str | os.PathLike) -> None:
    """Refuse to replace an existing directory that is not an earlier sotjax run."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise SotjaxInputError(f"{out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / RUN_MARKER).exists():
            raise SotjaxInputError(f"{out_dir}: exists, is not empty and is not a sotjax run directory; choose another --out")
    parent = out_dir.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise SotjaxInputError(f"{out_dir}: cannot create it ({parent} is not writable)")


def write_run(
    out_dir: str | os.PathLike,
    ids: np.ndarray,
    weights: np.ndarray,
    logits: np.ndarray,
    selection,
    config: dict[str, Any],
    stats: dict[str, Any],
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a run directory atomically: it appears complete, or not at all.

    Files: ``weights.parquet`` (id, weight, logit, rank, selected, train_weight),
    ``selected_ids.npy`` (kept ids, best first, as unicode strings), ``config.json``, ``stats.json``,
    plus ``extra_files`` (name -> bytes).
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    with atomic_directory(out_dir) as staging:
        write_weights(staging / "weights.parquet", ids, weights, logits, selection)
        (staging / "config.json").write_text(dumps_json(config), encoding="utf-8")
        (staging / "stats.json").write_text(dumps_json(stats), encoding="utf-8")
        for name, data in (extra_files or {}).items():
            (staging / name).write_bytes(data)
    return out_dir
