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
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from sotjax.errors import SotjaxInputError
from sotjax.io import iter_jsonl


class TextRecords(NamedTuple):
    """``ids, prompts, responses = read_text_records(path)``; ``responses`` is None in text mode."""

    ids: list[str]
    prompts: list[str]
    responses: list[str] | None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [row for _, row in iter_jsonl(path)]


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise SotjaxInputError(f"{path}: invalid JSON ({err.args[0]})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise SotjaxInputError(f"{path}: expected a JSON array of objects")
    return data


def _read_csv(path: Path, delimiter: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8", newline="") as fh:
        lines = fh.read().splitlines(keepends=True)
    start = 0
    while start < len(lines) and lines[start].lstrip().startswith("#"):
        start += 1
    reader = csv.DictReader(lines[start:], delimiter=delimiter)
    try:
        rows = [dict(r) for r in reader]
    except csv.Error as err:
        raise SotjaxInputError(f"{path}: invalid CSV ({err})") from None
    if reader.fieldnames is None:
        raise SotjaxInputError(f"{path}: CSV has no header row")
    return rows


def _read_arrow_table(table: Any) -> list[dict[str, Any]]:
    return table.to_pylist()


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return _read_arrow_table(pq.read_table(path))
    except Exception as err:
        raise SotjaxInputError(f"{path}: unreadable Parquet file ({err})") from None


def _read_hf_dataset_dir(path: Path, split: str | None) -> list[dict[str, Any]]:
    import pyarrow as pa

    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        except (ValueError, KeyError) as err:
            raise SotjaxInputError(f"{path / 'dataset_dict.json'}: invalid ({err})") from None
        chosen = split or ("train" if "train" in splits else (splits[0] if len(splits) == 1 else None))
        if chosen not in splits:
            raise SotjaxInputError(f"{path}: choose a split with --split (available: {', '.join(splits)})")
        path = path / chosen
    state_file = path / "state.json"
    if state_file.is_file():
        try:
            files = [f["filename"] for f in json.loads(state_file.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as err:
            raise SotjaxInputError(f"{state_file}: invalid ({err})") from None
    else:
        files = sorted(p.name for p in path.glob("*.arrow"))
    if not files:
        raise SotjaxInputError(f"{path}: not a dataset directory (no state.json or *.arrow files)")
    tables = []
    for name in files:
        try:
            with pa.memory_map(str(path / name)) as source:
                try:
                    tables.append(pa.ipc.open_stream(source).read_all())
                except pa.ArrowInvalid:
                    source.seek(0)
                    tables.append(pa.ipc.open_file(source).read_all())
        except (OSError, pa.ArrowInvalid) as err:
            raise SotjaxInputError(f"{path / name}: unreadable Arrow file ({err})") from None
    return _read_arrow_table(pa.concat_tables(tables))


def read_rows(path: str | os.PathLike, split: str | None = None) -> list[dict[str, Any]]:
    """All rows of ``path`` as dicts (see the module docstring for formats)."""
    path = Path(path)
    if not path.exists():
        raise SotjaxInputError(f"{path}: input not found")
    if path.is_dir():
        return _read_hf_dataset_dir(path, split)
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
    raise SotjaxInputError(f"{path}: unsupported input format '{suffix}' (use .jsonl, .json, .parquet, .csv or a dataset dir)")


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
    :class:`SotjaxInputError` naming the file, row and field for every problem.
    """
    path = Path(path)
    rows = read_rows(path, split)
    if not rows:
        raise SotjaxInputError(f"{path}: no rows")
    columns = set().union(*(r.keys() for r in rows))
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
            f"{path}: neither field '{prompt_field}' nor '{text_field}' is present "
            f"(columns: {', '.join(sorted(map(str, columns)))})"
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
            raise SotjaxInputError(f"{path}: row {i}: duplicate {id_field} '{v}' (also row {seen[v]})")
        seen[v] = i
    if len(fields) == 2:
        return TextRecords(ids, values[prompt_field], values[response_field])
    return TextRecords(ids, values[text_field], None)
