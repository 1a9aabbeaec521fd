"""``sotjax finetune`` / ``sotjax export`` end to end on a tiny model: outputs, resume, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from cli_helpers import one_line_error, snapshot, sotjax

from sotjax.cli import main
from sotjax.finetune.export import write_merged
from sotjax.rundir import write_run

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_llama"
IDS = [f"r{i}" for i in range(6)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from sotjax.finetune.causal_lm import random_causal_lm
    from sotjax.models.llama import LlamaConfig
    from sotjax.models.tokenizer import tokenizer_from_directory

    root = tmp_path_factory.mktemp("ft")
    cfg = LlamaConfig(vocab_size=320, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2)
    write_merged(random_causal_lm(cfg, seed=0), root / "model", tokenizer=tokenizer_from_directory(FIXTURE),
                 tokenizer_source=FIXTURE)
    data = root / "corpus.jsonl"
    data.write_text("".join(json.dumps({"id": i, "prompt": f"what is {k} plus {k}?", "response": f"it is {2 * k}."})
                            + "\n" for k, i in enumerate(IDS)))
    n = len(IDS)
    selected = np.array([True, True, False, True, True, False])
    tw = np.where(selected, [1.2, 0.8, 0, 1.5, 0.5, 0], 0.0)
    selection = SimpleNamespace(rank=np.arange(n), selected=selected, train_weight=tw,
                                selected_indices=np.flatnonzero(selected))
    write_run(root / "run", IDS, np.full(n, 1 / n), np.zeros(n), selection, {}, {})
    return SimpleNamespace(root=root, model=root / "model", data=data, run=root / "run")


def _args(inp, out, *extra):
    return ["finetune", "--run", inp.run, "--data", inp.data, "--model", inp.model, "--out", out,
            "--lora-rank", "2", "--epochs", "1", "--batch-size", "2", "--max-len", "32", "--dtype", "float32",
            "--lr", "1e-2", "--no-progress", *extra]


def test_finetune_end_to_end(inputs, tmp_path):
    out = tmp_path / "ft"
    proc = sotjax(*_args(inputs, out), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 rows (topk+weights), 2 steps" in proc.stdout
    marker = json.loads((out / ".sotjax-run").read_text())
    assert marker["kind"] == "finetune"
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "merged/model.safetensors",
            "merged/config.json", "merged/tokenizer.json", "config.json", "stats.json"} <= set(marker["files"])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows"] == 4 and stats["steps"] == 2 and len(stats["losses"]) == 2
    assert not (tmp_path / ".ft.finetune-ckpt").exists()
    # the merged checkpoint equals base + adapter
    from sotjax.finetune.causal_lm import load_causal_lm
    from sotjax.finetune.export import read_adapter
    from sotjax.finetune.lora import apply_lora, set_lora_arrays

    base = load_causal_lm(inputs.model)
    config, arrays = read_adapter(out / "adapter", 2)
    apply_lora(base.model, config)
    set_lora_arrays(base.model, arrays)
    merged = load_causal_lm(out / "merged")
    ids = np.array([[1, 5, 9, 30, 2]])
    mask = np.ones_like(ids)
    np.testing.assert_allclose(np.asarray(merged.model(ids, mask)), np.asarray(base.model(ids, mask)), atol=3e-5)
    # an existing fine-tune directory of sotjax's own is replaced; ablation flags run
    assert main([str(a) for a in _args(inputs, out, "--all-rows", "--no-weights", "--no-merged")]) == 0
    assert json.loads((out / "stats.json").read_text())["mode"] == "all"
    assert not (out / "merged").exists()


def test_export_rows_cli(inputs, tmp_path, capsys):
    out = tmp_path / "kept.jsonl"
    assert main(["export", "--run", str(inputs.run), "--data", str(inputs.data), "--out", str(out), "--ranked"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["r3", "r0", "r1", "r4"] and rows[0]["weight"] == 1.5
    assert main(["export", "--run", str(inputs.run), "--data", str(inputs.data), "--out", str(tmp_path / "x.csv")]) == 2
    assert "choose a .jsonl or .parquet" in capsys.readouterr().err


def _bad(inputs, tmp_path, capsys, args, needle):
    before = snapshot(tmp_path)
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and needle in lines[0], err
    assert snapshot(tmp_path) == before  # nothing written


def test_bad_inputs_are_one_line_and_write_nothing(inputs, tmp_path, capsys):
    out = tmp_path / "ft"
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"id": f"x{k}", "prompt": "p", "response": "r"}) + "\n" for k in range(6)))
    _bad(inputs, tmp_path, capsys, _args(inputs, out)[:4] + [other] + _args(inputs, out)[5:],
         "of the run's 6 ids are not in the data")
    _bad(inputs, tmp_path, capsys, _args(inputs, out, "--targets", "q_proj,wq"), "unknown target module 'wq'")
    _bad(inputs, tmp_path, capsys, _args(inputs, out)[:-1] + ["--lora-rank", "0", "--no-progress"], "--lora-rank")
    _bad(inputs, tmp_path, capsys, _args(inputs, out)[:6] + [FIXTURE] + _args(inputs, out)[7:], "no 'lm_head.weight'")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    _bad(inputs, tmp_path, capsys, _args(inputs, foreign), "is not a sotjax fine-tune directory")
    _bad(inputs, tmp_path, capsys, _args(inputs, out, "--epochs", "0"), "--epochs")


def test_resume_after_kill_matches_uninterrupted(inputs, tmp_path):
    """The CLI resumes from the checkpoint of a killed run and ends with the same adapter."""
    import signal
    import subprocess
    import sys
    import time

    from safetensors.numpy import load_file

    common = ["--epochs", "3", "--batch-size", "1", "--checkpoint-every", "2"]
    ref = tmp_path / "ref"
    proc = sotjax(*_args(inputs, ref, *common), timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "run2"
    ckpt = tmp_path / ".run2.finetune-ckpt" / "checkpoint.npz"
    env = {**__import__("os").environ, "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen([sys.executable, "-m", "sotjax.cli", *map(str, _args(inputs, out, *common))], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 150
    while not ckpt.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if child.poll() is not None:
        pytest.skip("the run finished before it could be killed")
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not out.exists() and ckpt.exists()
    again = sotjax(*_args(inputs, out, *common), timeout=60)
    one_line_error(again, 2, "finetune")
    assert "--resume" in again.stderr
    proc = sotjax(*_args(inputs, out, *common, "--resume"), timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "stats.json").read_text())["resumed_from"] is not None
    a = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
