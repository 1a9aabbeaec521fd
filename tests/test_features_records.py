"""read_text_records: every input format, field options and clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sotjax.errors import SotjaxInputError
from sotjax.features import read_text_records

ROWS = [
    {"id": "a", "prompt": "How do I bake bread?", "response": "Mix, knead, bake.", "extra": 1},
    {"id": "b", "prompt": "Capital of France?", "response": "Paris, a city with \"quotes\",\ncommas."},
    {"id": "c", "prompt": "Say nothing.", "response": ""},
]


def _write(tmp_path: Path, fmt: str, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "jsonl":
        p = tmp_path / "d.jsonl"
        p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    elif fmt == "json":
        p = tmp_path / "d.json"
        p.write_text(json.dumps(rows))
    elif fmt == "csv":
        import csv

        p = tmp_path / "d.csv"
        with open(p, "w", newline="", encoding="utf-8") as fh:
            fh.write("# a comment line\n")
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in rows[0]})
    elif fmt == "parquet":
        p = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), p)
    elif fmt in ("hf", "hfdict"):
        base = tmp_path / "ds"
        p = base / "train" if fmt == "hfdict" else base
        p.mkdir(parents=True)
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(p / "data-00000-of-00001.arrow"), "wb") as sink, \
                pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        (p / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
        (p / "dataset_info.json").write_text("{}")
        if fmt == "hfdict":
            (base / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
        p = base
    return p


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "hf", "hfdict"])
def test_pairs_in_every_format(tmp_path, fmt):
    ids, prompts, responses = read_text_records(_write(tmp_path, fmt, ROWS))
    assert ids == ["a", "b", "c"]
    assert prompts == [r["prompt"] for r in ROWS]
    assert responses == [r["response"] for r in ROWS]


def test_text_mode_custom_fields_and_row_ids(tmp_path):
    rows = [{"body": "first text", "key": 7}, {"body": "second text", "key": 8}]
    rec = read_text_records(_write(tmp_path, "jsonl", rows), text_field="body", id_field="key")
    assert rec == (["7", "8"], ["first text", "second text"], None)
    rec = read_text_records(_write(tmp_path, "json", [{"text": "x"}, {"text": "y"}]))
    assert rec.ids == ["0", "1"] and rec.responses is None
    rec = read_text_records(_write(tmp_path, "parquet", [{"q": "u", "a": "v"}]), prompt_field="q", response_field="a")
    assert rec == (["0"], ["u"], ["v"])


def test_bad_inputs_name_file_row_and_field(tmp_path):
    with pytest.raises(SotjaxInputError, match="input not found"):
        read_text_records(tmp_path / "none.jsonl")
    p = _write(tmp_path, "jsonl", [{"prompt": "only a prompt"}])
    with pytest.raises(SotjaxInputError, match=r"d.jsonl: field 'response' is missing"):
        read_text_records(p)
    with pytest.raises(SotjaxInputError, match=r"neither field 'prompt' nor 'text'"):
        read_text_records(_write(tmp_path, "json", [{"foo": "bar"}]))
    with pytest.raises(SotjaxInputError, match=r"row 1: field 'prompt' is empty"):
        read_text_records(_write(tmp_path, "jsonl", [ROWS[0], {**ROWS[1], "prompt": "  "}]))
    with pytest.raises(SotjaxInputError, match=r"row 0: field 'text' is missing"):
        read_text_records(_write(tmp_path, "json", [{"text": None}]))
    with pytest.raises(SotjaxInputError, match=r"row 0: field 'text' is a int"):
        read_text_records(_write(tmp_path, "json", [{"text": 5}]))
    with pytest.raises(SotjaxInputError, match=r"row 2: duplicate id 'a' \(also row 0\)"):
        read_text_records(_write(tmp_path, "jsonl", [*ROWS[:2], {**ROWS[0]}]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(SotjaxInputError, match=r"bad.jsonl: line 2: malformed JSON"):
        read_text_records(bad)
    odd = tmp_path / "d.xlsx"
    odd.write_text("x")
    with pytest.raises(SotjaxInputError, match="unsupported input format"):
        read_text_records(odd)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SotjaxInputError, match="no rows"):
        read_text_records(empty)
    (tmp_path / "notds").mkdir()
    with pytest.raises(SotjaxInputError, match="not a dataset directory"):
        read_text_records(tmp_path / "notds")
