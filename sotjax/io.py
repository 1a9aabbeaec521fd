"""The I/O edge of sotjax: reading embedding sets, and the generic file helpers every reader shares.

The run directory's files are owned by :mod:`sotjax.rundir` (their schema, writers and reader);
this module holds what is not specific to a format: bounded JSON/JSONL/YAML/Parquet readers,
:func:`to_jsonable` / :func:`dumps_json`, and path confinement (:func:`resolve_inside`).

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
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from sotjax.errors import SotjaxInputError, shorten

EMBEDDING_FIELD = "embedding"
ID_FIELD = "id"
EMBEDDING_SUFFIXES = (".npy", ".jsonl", ".parquet")
#: longest JSONL line read (bytes); a longer line is refused, so memory stays bounded
MAX_LINE_BYTES = 64 << 20
#: largest YAML config read (bytes)
MAX_CONFIG_BYTES = 1 << 20
_MAX_FLOAT_INT = 2**1023


def check_input_file(path: str | os.PathLike) -> Path:
    """Refuse anything but an existing, readable regular file (one line naming it).

    Devices (``/dev/zero``), FIFOs and sockets would make a reader wait or read forever.
    """
    path = Path(path)
    if not path.exists():
        raise SotjaxInputError(f"{path}: no such file")
    if not path.is_file():
        raise SotjaxInputError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise SotjaxInputError(f"{path}: not readable (permission denied)")
    return path


def _check_ids(ids: Sequence[Any], path: Path) -> np.ndarray:
    out = np.asarray([str(i) for i in ids], dtype=object)
    seen: dict[str, int] = {}
    for row, key in enumerate(out):
        if key in seen:
            raise SotjaxInputError(f"{path}: duplicate id {shorten(key)} (rows {seen[key]} and {row})")
        seen[key] = row
    return out


def open_npy(path: str | os.PathLike) -> np.ndarray:
    """A 2-D float ``.npy`` file memory-mapped (``mmap_mode="r"``): nothing beyond its header is read
    until rows are indexed. float16, float32, float64 and bfloat16 storage: ``np.save`` writes a
    bfloat16 array (ml_dtypes, as JAX produces) with the dtype ``|V2``, which is read back as
    bfloat16. One-line errors name the file (not a readable ``.npy``, not 2-D, not float)."""
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:  # numpy raises several types for bad files
        raise SotjaxInputError(f"{path}: not a readable .npy array ({type(err).__name__}: {error_text(err)})"
                               ) from None
    if x.ndim != 2:
        raise SotjaxInputError(f"{path}: expected a 2-D array (samples x dim), got shape {x.shape}")
    if x.dtype == np.dtype("V2"):
        import ml_dtypes  # noqa: PLC0415 - a JAX dependency

        x = x.view(ml_dtypes.bfloat16)
    elif not np.issubdtype(x.dtype, np.floating):
        raise SotjaxInputError(f"{path}: expected a float array, got dtype {x.dtype}")
    return x


def _read_npy(path: Path, ids_path: Path | None) -> tuple[np.ndarray, np.ndarray]:
    x = open_npy(path)
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
    check_input_file(path)
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as err:
            raise SotjaxInputError(f"{path}: not a readable .npy ids array ({err})") from None
        if arr.ndim != 1:
            raise SotjaxInputError(f"{path}: ids must be a 1-D array, got shape {arr.shape}")
        return [str(v) for v in arr.tolist()]
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a leading byte-order mark is not an id
    except (OSError, UnicodeDecodeError) as err:
        raise SotjaxInputError(f"{path}: cannot read ids ({err})") from None
    return [line.strip() for line in lines if line.strip()]


def _as_vector(value: Any, where: str, dim: int | None) -> list[float]:
    if not isinstance(value, list) or not value:
        raise SotjaxInputError(f"{where}: field '{EMBEDDING_FIELD}' must be a non-empty list of numbers")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SotjaxInputError(f"{where}: field '{EMBEDDING_FIELD}' must contain only numbers")
        if isinstance(v, int) and abs(v) > _MAX_FLOAT_INT:
            raise SotjaxInputError(f"{where}: field '{EMBEDDING_FIELD}' holds an integer too large for a float "
                                   f"({len(str(abs(v)))} digits)")
    if dim is not None and len(value) != dim:
        raise SotjaxInputError(f"{where}: '{EMBEDDING_FIELD}' has {len(value)} values, expected {dim}")
    return value


def iter_jsonl(path: str | os.PathLike, max_line_bytes: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each non-blank line of a JSONL file.

    One-line :class:`SotjaxInputError` (naming the file and line) for a missing, unreadable or
    non-regular file (a FIFO or a device would never end), non-UTF-8 text, a line longer than
    ``max_line_bytes`` (default :data:`MAX_LINE_BYTES`), malformed JSON, JSON nested deeper than
    Python can parse, an integer literal beyond Python's digit limit, or a line that is not a JSON
    object. Memory stays bounded by the line cap whatever the file holds.
    """
    path = check_input_file(path)
    limit = MAX_LINE_BYTES if max_line_bytes is None else max_line_bytes
    try:
        handle = path.open("rb")
    except OSError as err:
        raise SotjaxInputError(f"{path}: cannot open ({err.strerror})") from None
    with handle:
        lineno = 0
        while True:
            raw = handle.readline(limit + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > limit:
                raise SotjaxInputError(f"{path}: line {lineno}: longer than {limit} bytes (not a JSONL record)")
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise SotjaxInputError(f"{path}: line {lineno}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SotjaxInputError(f"{path}: line {lineno}: malformed JSON ({err.msg})") from None
            except ValueError as err:  # e.g. an integer literal beyond sys.get_int_max_str_digits()
                raise SotjaxInputError(f"{path}: line {lineno}: invalid JSON value ({shorten(str(err))})") from None
            except RecursionError:
                raise SotjaxInputError(f"{path}: line {lineno}: JSON nested too deeply") from None
            if not isinstance(record, dict):
                raise SotjaxInputError(f"{path}: line {lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


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
    x = np.asarray(rows, dtype=np.float64).reshape(len(rows), dim or 0)  # float64: any finite value
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
    x = np.asarray(rows, dtype=np.float64).reshape(len(rows), dim or 0)  # float64: any finite value
    if ID_FIELD in table.column_names:
        ids = [str(v) for v in table.column(ID_FIELD).to_pylist()]
    else:
        ids = [str(i) for i in range(len(rows))]
    return x, _check_ids(ids, path)


def read_embeddings(
    path: str | os.PathLike, ids_path: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read one embedding set; returns ``(x, ids)`` with ``x`` of shape ``(n, d)``."""
    path = Path(path)
    check_input_file(path)
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
    check_input_file(path)
    if suffix == ".npy":
        return True
    if suffix == ".jsonl":
        try:
            with path.open("r", encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except (ValueError, RecursionError):
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
    """Recursively convert NumPy values, mappings, paths and dataclasses to JSON types; NaN/inf become None.

    The one converter of everything sotjax writes as JSON (run files, the report's run information).
    """
    if isinstance(x, Mapping):
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
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if hasattr(x, "__dataclass_fields__"):
        import dataclasses

        return to_jsonable(dataclasses.asdict(x))
    return x


def dumps_json(value: Any) -> str:
    """``value`` as indented JSON text (via :func:`to_jsonable`; never NaN/inf), ending with a newline."""
    return json.dumps(to_jsonable(value), indent=2, allow_nan=False) + "\n"


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML config file as a mapping with string keys (one-line errors naming the file).

    Hostile YAML is refused before it is built: files over :data:`MAX_CONFIG_BYTES`, and anchors
    and aliases (``&a`` / ``*a``), which can expand a few hundred bytes into gigabytes.
    """
    import yaml

    path = check_input_file(path)
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise SotjaxInputError(f"{path}: config file larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise SotjaxInputError(f"{path}: cannot read ({shorten(str(err))})") from None
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                line = event.start_mark.line + 1
                raise SotjaxInputError(f"{path}: line {line}: YAML anchors and aliases are not allowed in a config")
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise SotjaxInputError(f"{path}: malformed YAML{line}") from None
    except RecursionError:
        raise SotjaxInputError(f"{path}: YAML nested too deeply") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise SotjaxInputError(f"{path}: expected a mapping of config fields, got {type(loaded).__name__}")
    for key in loaded:
        if not isinstance(key, str):
            raise SotjaxInputError(f"{path}: field names must be strings, got {shorten(key)}")
    return loaded


def error_text(err: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, at most ``limit`` characters (for one-line errors)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def read_json_file(path: str | os.PathLike, max_bytes: int, what: str = "JSON file", hint: str = "") -> Any:
    """Parse a whole JSON file of at most ``max_bytes`` bytes (one-line errors naming the file).

    A missing, unreadable or non-regular file, one over the cap (refused before it is read:
    ``"{path}: {what} larger than N bytes{hint}"``), non-UTF-8 text, malformed JSON, an integer
    beyond Python's digit limit and JSON nested too deeply are each one :class:`SotjaxInputError`.
    """
    path = check_input_file(path)
    too_big = f"{path}: {what} larger than {max_bytes} bytes{hint}"
    if path.stat().st_size > max_bytes:
        raise SotjaxInputError(too_big)
    try:
        with path.open("rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as err:
        raise SotjaxInputError(f"{path}: cannot open ({err.strerror})") from None
    if len(raw) > max_bytes:
        raise SotjaxInputError(too_big)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SotjaxInputError(f"{path}: not UTF-8 text (byte {err.start})") from None
    del raw
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SotjaxInputError(f"{path}: line {err.lineno}: malformed JSON ({err.msg})") from None
    except ValueError as err:  # an integer literal beyond sys.get_int_max_str_digits()
        raise SotjaxInputError(f"{path}: invalid JSON value ({error_text(err)})") from None
    except RecursionError:
        raise SotjaxInputError(f"{path}: JSON nested too deeply") from None


def read_parquet_columns(path: str | os.PathLike, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """The named columns of a Parquet file as NumPy arrays; one-line errors naming the file/column."""
    import pyarrow.parquet as pq

    path = check_input_file(path)
    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
    except Exception as err:  # pyarrow raises several types
        raise SotjaxInputError(f"{path}: not a readable Parquet file ({type(err).__name__})") from None
    for c in columns:
        if c not in names:
            raise SotjaxInputError(f"{path}: column '{c}' is missing")
    try:
        table = parquet.read(columns=list(columns))
    except Exception as err:
        raise SotjaxInputError(f"{path}: not a readable Parquet file ({type(err).__name__})") from None
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}


# ------------------------------------------------------------------------------- path confinement
def resolve_inside(base: str | os.PathLike, entry: Any, listed_in: str | os.PathLike, what: str,
                   allowed: tuple[Path, ...] = ()) -> Path:
    """The real path of ``base / entry``, refusing anything that leaves ``base``.

    ``entry`` is a relative path read from the file ``listed_in`` (an index, a ``state.json``);
    ``what`` names it in the message (e.g. ``"_data_files[0] filename"``). Refused with one
    :class:`SotjaxInputError` line naming ``listed_in`` and the entry: a non-string or empty entry,
    a NUL byte, an absolute path, a ``..`` component, and a path that resolves (through symbolic
    links) outside ``base`` and outside every directory in ``allowed`` (see :func:`hub_cache_roots`).
    """
    where = f"{listed_in}: {what} {shorten(entry)}"
    if not isinstance(entry, str) or not entry.strip():
        raise SotjaxInputError(f"{where}: must be a relative path (a non-empty string)")
    if "\0" in entry:
        raise SotjaxInputError(f"{where}: contains a NUL byte")
    pure = PurePosixPath(entry)
    if pure.is_absolute() or entry.startswith("\\") or (len(entry) > 1 and entry[1] == ":"):
        raise SotjaxInputError(f"{where}: is an absolute path; only paths inside {base} are read")
    if ".." in pure.parts or ".." in entry.split("\\"):
        raise SotjaxInputError(f"{where}: leaves its directory ('..'); only paths inside {base} are read")
    try:
        root = Path(base).resolve()
        real = (root / entry).resolve()
    except (OSError, RuntimeError) as err:  # a symbolic link loop
        raise SotjaxInputError(f"{where}: cannot be resolved ({error_text(err)})") from None
    if not any(real == r or r in real.parents for r in (root, *(a.resolve() for a in allowed))):
        raise SotjaxInputError(f"{where}: resolves outside {base} (a symbolic link?); only paths inside it are read")
    return real


def hub_cache_roots(directory: str | os.PathLike) -> tuple[Path, ...]:
    """Where else a model directory's files may resolve: ``()``, or the hub cache's ``blobs`` folder.

    A Hugging Face hub cache snapshot (``models--org--name/snapshots/<revision>/``) holds symbolic
    links to ``models--org--name/blobs/``; those stay allowed, nothing else outside the directory.
    """
    real = Path(directory).resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return (real.parent.parent / "blobs",)
    return ()
