"""Read text records (id, prompt, response) from JSONL, JSON, Parquet, CSV or a saved HF dataset.

Formats, chosen by suffix / layout:

- ``.jsonl`` / ``.ndjson``: one JSON object per line (blank lines skipped);
- ``.json``: a JSON array of objects;
- ``.parquet``: read with pyarrow;
- ``.csv`` / ``.tsv``: header row; leading lines starting with ``#`` are comments;
- a directory written by ``datasets.Dataset.save_to_disk`` (``state.json`` + ``data-*.arrow``, Arrow
  IPC streams, read with pyarrow; the ``datasets`` package is not needed), or a ``DatasetDict`` directory
  (``dataset_dict.json``) with ``split`` choosing the split (default ``train`` when present).

Modes: if the prompt field exists the response field must exist too → pairs; otherwise the text
field → single texts (``responses is None``). Ids come from the id field (as strings) when present,
else from the row number (``"0"``, ``"1"``, ...); duplicated ids are an error. Every value must be
a string; ``null`` or an empty prompt/text is an error naming the file, the row and the field.

Limits (each refused with one :class:`SotjaxInputError` line naming the file, and the line where
there is one), so that memory and time stay bounded whatever the input holds:

- every file read must be a regular, readable file: devices (``/dev/zero``), FIFOs and sockets are
  refused instead of read forever;
- a JSONL line, a CSV/TSV line and a CSV/TSV record (quoted fields may span lines) are at most
  :data:`MAX_LINE_BYTES` (64 MiB);
- a ``.json`` file is at most :data:`MAX_JSON_BYTES` (1 GiB; use JSONL for bigger corpora);
- a Parquet file or a dataset directory holds at most :data:`MAX_TABLE_BYTES` (2 GiB) of Arrow data;
- a dataset directory's ``state.json`` / ``dataset_dict.json`` is at most :data:`MAX_METADATA_BYTES`,
  and every file or split it names must stay inside the directory: absolute paths, ``..`` and
  symbolic links that resolve outside are refused (:func:`sotjax.io.resolve_inside`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from sotjax.errors import SotjaxInputError, shorten
from sotjax.io import MAX_LINE_BYTES, check_input_file, iter_jsonl, read_json_file, resolve_inside
from sotjax.io import error_text as _why

#: largest ``.json`` input (bytes); it is parsed as a whole
MAX_JSON_BYTES = 1 << 30
#: most Arrow data (bytes, as loaded) read from a Parquet file or a dataset directory
MAX_TABLE_BYTES = 2 << 30
#: largest ``state.json`` / ``dataset_dict.json`` of a dataset directory
MAX_METADATA_BYTES = 16 << 20

__all__ = ["MAX_JSON_BYTES", "MAX_LINE_BYTES", "MAX_METADATA_BYTES", "MAX_TABLE_BYTES", "TextRecords",
           "read_rows", "read_text_records"]


class TextRecords(NamedTuple):
    """``ids, prompts, responses = read_text_records(path)``; ``responses`` is None in text mode."""

    ids: list[str]
    prompts: list[str]
    responses: list[str] | None


def _open_binary(path: Path):
    try:
        return path.open("rb")
    except OSError as err:
        raise SotjaxInputError(f"{path}: cannot open ({err.strerror})") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [row for _, row in iter_jsonl(path, MAX_LINE_BYTES)]


def _read_json(path: Path) -> list[dict[str, Any]]:
    data = read_json_file(path, MAX_JSON_BYTES, hint="; use JSONL (one record per line) for bigger inputs")
    if not isinstance(data, list):
        raise SotjaxInputError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise SotjaxInputError(f"{path}: expected a JSON array of objects (item {i} is {type(row).__name__})")
    return data


def _read_csv(path: Path, delimiter: str) -> list[dict[str, Any]]:
    """CSV/TSV rows as dicts, like :class:`csv.DictReader`, reading at most one bounded record at a time."""
    limit = MAX_LINE_BYTES
    lineno = 0
    record_chars = 0
    try:
        handle = path.open("r", encoding="utf-8-sig", newline="")
    except OSError as err:
        raise SotjaxInputError(f"{path}: cannot open ({err.strerror})") from None

    def lines() -> Iterator[str]:
        nonlocal lineno, record_chars
        leading = True
        while True:
            try:
                line = handle.readline(limit + 1)
            except UnicodeDecodeError:
                raise SotjaxInputError(f"{path}: line {_first_non_utf8_line(path, limit)}: not UTF-8 text") from None
            if not line:
                return
            lineno += 1
            if len(line) > limit:
                raise SotjaxInputError(f"{path}: line {lineno}: longer than {limit} characters (not a CSV record)")
            if leading and line.lstrip().startswith("#"):
                continue
            leading = False
            record_chars += len(line)
            if record_chars > limit:
                raise SotjaxInputError(
                    f"{path}: line {lineno}: CSV record longer than {limit} characters (an unclosed quote?)")
            yield line

    rows: list[dict[str, Any]] = []
    header: list[str] | None = None
    old_limit = csv.field_size_limit(limit)
    try:
        with handle:
            reader = csv.reader(lines(), delimiter=delimiter)
            for row in reader:
                record_chars = 0
                if not row:
                    continue
                if header is None:
                    header = row
                    continue
                record: dict[Any, Any] = dict(zip(header, row, strict=False))
                if len(row) > len(header):
                    record[None] = row[len(header):]  # csv.DictReader's restkey
                for key in header[len(row):]:
                    record.setdefault(key, None)
                rows.append(record)
    except csv.Error as err:
        raise SotjaxInputError(f"{path}: line {lineno}: invalid CSV ({_why(err)})") from None
    finally:
        csv.field_size_limit(old_limit)
    if header is None:
        raise SotjaxInputError(f"{path}: CSV has no header row")
    return rows


def _first_non_utf8_line(path: Path, limit: int) -> int | str:
    """The number of the first line that is not UTF-8 (text-mode reading decodes ahead of the line)."""
    with _open_binary(path) as fh:
        lineno = 0
        while True:
            raw = fh.readline(limit + 1)
            if not raw:
                return "?"
            lineno += 1
            try:
                raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                return lineno


def _table_rows(table: Any, where: Path) -> list[dict[str, Any]]:
    import pyarrow as pa

    try:
        rows: list[dict[str, Any]] = table.to_pylist()
        return rows
    except (pa.ArrowException, ValueError, OverflowError, TypeError) as err:
        raise SotjaxInputError(f"{where}: cannot convert the table's values ({type(err).__name__}: "
                               f"{_why(err)})") from None


class _TableBudget:
    """Arrow bytes still allowed for one input (:data:`MAX_TABLE_BYTES`)."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.used = 0

    def take(self, batch: Any, file: Path) -> Any:
        self.used += int(batch.nbytes)
        if self.used > MAX_TABLE_BYTES:
            where = self.where if file == self.where else f"{self.where} ({file.name})"
            raise SotjaxInputError(f"{where}: more than {MAX_TABLE_BYTES} bytes of data; split the input")
        return batch


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    budget = _TableBudget(path)
    try:
        pf = pq.ParquetFile(path)
        meta = pf.metadata  # sizes as stored (before decoding): a lower bound, refused before reading any data
        if sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)) > MAX_TABLE_BYTES:
            raise SotjaxInputError(f"{path}: more than {MAX_TABLE_BYTES} bytes of data; split the input")
        batches = [budget.take(b, path) for b in pf.iter_batches(batch_size=4096)]
        table = pa.Table.from_batches(batches) if batches else pf.schema_arrow.empty_table()
    except SotjaxInputError:
        raise
    except Exception as err:  # pyarrow raises OSError / ArrowInvalid / ... for damaged files
        raise SotjaxInputError(f"{path}: unreadable Parquet file ({type(err).__name__}: "
                               f"{_why(err)})") from None
    return _table_rows(table, path)


def _read_arrow_file(file: Path, budget: _TableBudget) -> Any:
    """One ``data-*.arrow`` file (Arrow IPC stream, or the IPC file format)."""
    import pyarrow as pa

    check_input_file(file)
    try:
        with pa.memory_map(str(file)) as source:
            try:
                stream = pa.ipc.open_stream(source)
                schema = stream.schema
                batches = [budget.take(b, file) for b in stream]
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                schema = reader.schema
                batches = [budget.take(reader.get_batch(i), file) for i in range(reader.num_record_batches)]
            return pa.Table.from_batches(batches, schema=schema)
    except SotjaxInputError:
        raise
    except (OSError, pa.ArrowException, ValueError) as err:
        raise SotjaxInputError(f"{file}: unreadable Arrow file ({type(err).__name__}: {_why(err)})") from None


def _split_directory(path: Path, split: str | None) -> Path:
    """The split directory a ``DatasetDict`` directory's ``dataset_dict.json`` points ``split`` to."""
    listing = path / "dataset_dict.json"
    info = read_json_file(listing, MAX_METADATA_BYTES, "dataset_dict.json")
    splits = info.get("splits") if isinstance(info, dict) else None
    if not isinstance(splits, list) or not splits or not all(isinstance(s, str) and s for s in splits):
        raise SotjaxInputError(f"{listing}: field 'splits' must be a non-empty list of split names")
    for name in splits:
        if "/" in name or "\\" in name or name in (".", ".."):
            raise SotjaxInputError(f"{listing}: split name {shorten(name)} is not a plain directory name")
    chosen = split or ("train" if "train" in splits else (splits[0] if len(splits) == 1 else None))
    if chosen is None or chosen not in splits:
        available = _cut(", ".join(splits), 200)
        raise SotjaxInputError(f"{path}: choose a split with --split (available: {available})")
    directory = resolve_inside(path, chosen, listing, "split")
    if not directory.is_dir():
        raise SotjaxInputError(f"{listing}: split {shorten(chosen)} has no directory {path / chosen}")
    return directory


def _data_files(path: Path) -> list[Path]:
    """The Arrow files of one dataset directory, each confined to it."""
    state_file = path / "state.json"
    if state_file.exists() or state_file.is_symlink():
        state = read_json_file(state_file, MAX_METADATA_BYTES, "state.json")
        entries = state.get("_data_files") if isinstance(state, dict) else None
        if not isinstance(entries, list) or not entries:
            raise SotjaxInputError(f"{state_file}: field '_data_files' must be a non-empty list")
        files = []
        for i, entry in enumerate(entries):
            name = entry.get("filename") if isinstance(entry, dict) else None
            files.append(resolve_inside(path, name, state_file, f"_data_files[{i}] filename"))
        return files
    return [resolve_inside(path, p.name, path, "file") for p in sorted(path.glob("*.arrow"))]


def _read_hf_dataset_dir(path: Path, split: str | None) -> list[dict[str, Any]]:
    import pyarrow as pa

    if (path / "dataset_dict.json").exists() or (path / "dataset_dict.json").is_symlink():
        path = _split_directory(path, split)
    files = _data_files(path)
    if not files:
        raise SotjaxInputError(f"{path}: not a dataset directory (no state.json or *.arrow files)")
    budget = _TableBudget(path)
    tables = [_read_arrow_file(f, budget) for f in files]
    try:
        table = pa.concat_tables(tables)
    except (pa.ArrowException, ValueError) as err:
        raise SotjaxInputError(f"{path}: its Arrow files do not share one schema ({_why(err)})") from None
    return _table_rows(table, path)


def read_rows(path: str | os.PathLike, split: str | None = None) -> list[dict[str, Any]]:
    """All rows of ``path`` as dicts (see the module docstring for formats and limits)."""
    path = Path(path)
    if not path.exists():
        raise SotjaxInputError(f"{path}: input not found")
    if path.is_dir():
        return _read_hf_dataset_dir(path, split)
    check_input_file(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".parquet":
            return _read_parquet(path)
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, "\t" if suffix == ".tsv" else ",")
    except UnicodeDecodeError as err:
        raise SotjaxInputError(f"{path}: not UTF-8 text ({err.reason})") from None
    raise SotjaxInputError(
        f"{path}: unsupported input format {shorten(suffix)} (use .jsonl, .json, .parquet, .csv or a dataset dir)")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def _columns_text(columns: set[Any]) -> str:
    names = sorted(map(str, columns))
    shown = ", ".join(_cut(n, 40) for n in names[:20])
    return shown + (f", … ({len(names)} in all)" if len(names) > 20 else "")


def read_text_records(
    path: str | os.PathLike,
    prompt_field: str = "prompt",
    response_field: str = "response",
    id_field: str = "id",
    text_field: str = "text",
    split: str | None = None,
) -> TextRecords:
    """Read ``(ids, prompts, responses)`` from a file or dataset directory.

    Pair mode when ``prompt_field`` is a column (then ``response_field`` must be one too);
    otherwise text mode from ``text_field`` with ``responses=None``. Raises
    :class:`SotjaxInputError` naming the file, row and field for every problem (see the module
    docstring for the size limits).
    """
    path = Path(path)
    rows = read_rows(path, split)
    if not rows:
        raise SotjaxInputError(f"{path}: no rows")
    columns: set[Any] = set().union(*(r.keys() for r in rows))
    if prompt_field in columns:
        if response_field not in columns:
            raise SotjaxInputError(
                f"{path}: field '{response_field}' is missing (found '{prompt_field}'; use --text-field "
                f"{prompt_field} to embed prompts alone)"
            )
        fields = [prompt_field, response_field]
    elif text_field in columns:
        fields = [text_field]
    else:
        raise SotjaxInputError(
            f"{path}: neither field '{prompt_field}' nor '{text_field}' is present (columns: {_columns_text(columns)})"
        )
    values: dict[str, list[str]] = {f: [] for f in fields}
    for i, row in enumerate(rows):
        for f in fields:
            v = row.get(f)
            if not isinstance(v, str):
                got = "missing" if v is None else f"a {type(v).__name__}, not a string"
                raise SotjaxInputError(f"{path}: row {i}: field '{f}' is {got}")
            if f != response_field and not v.strip():
                raise SotjaxInputError(f"{path}: row {i}: field '{f}' is empty")
            values[f].append(v)
    if id_field in columns:
        ids = []
        for i, row in enumerate(rows):
            v = row.get(id_field)
            if v is None or (isinstance(v, str) and not v.strip()):
                raise SotjaxInputError(f"{path}: row {i}: field '{id_field}' is missing")
            ids.append(str(v))
    else:
        ids = [str(i) for i in range(len(rows))]
    seen: dict[str, int] = {}
    for i, v in enumerate(ids):
        if v in seen:
            raise SotjaxInputError(f"{path}: row {i}: duplicate {id_field} {shorten(v)} (also row {seen[v]})")
        seen[v] = i
    if len(fields) == 2:
        return TextRecords(ids, values[prompt_field], values[response_field])
    return TextRecords(ids, values[text_field], None)
