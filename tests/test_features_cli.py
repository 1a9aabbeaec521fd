"""`sotjax embed` end to end through the CLI dispatcher (outputs, ids, metadata, exit code 2 on bad input)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sotjax import cli
from sotjax.features import FeatureConfig, embed_texts

TINY = Path(__file__).parent / "fixtures" / "tiny_llama"


@pytest.fixture
def embed_only(monkeypatch):
    """Dispatch only the embed subcommand (other subcommands may be built in parallel)."""
    monkeypatch.setattr(cli, "SUBCOMMANDS", {"embed": "sotjax.commands.embed"})


def test_embed_writes_npy_ids_and_meta(tmp_path, embed_only, capsys):
    src = tmp_path / "pairs.jsonl"
    rows = [{"uid": f"r{i}", "q": f"Question number {i} about bread?", "a": f"Answer {i}."} for i in range(5)]
    src.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out" / "feats.npy"
    argv = ["embed", "--input", str(src), "--model", str(TINY), "--out", str(out), "--prompt-field", "q",
            "--response-field", "a", "--id-field", "uid", "--max-length", "64", "--batch-size", "2",
            "--dtype", "float16", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert cli.main(argv) == 0
    z = np.load(out)
    assert z.shape == (5, 32) and z.dtype == np.float16
    assert np.load(tmp_path / "out" / "feats.ids.npy").tolist() == [r["uid"] for r in rows]
    meta = json.loads((tmp_path / "out" / "feats.meta.json").read_text())
    assert meta["mode"] == "pairs" and meta["n"] == 5 and meta["template"] == "human_assistant"
    ref = embed_texts([r["q"] for r in rows], [r["a"] for r in rows], FeatureConfig(model=str(TINY), max_length=64),
                      progress=False)
    np.testing.assert_allclose(z.astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    assert cli.main(argv) == 0  # re-run is served from the cache
    assert json.loads((tmp_path / "out" / "feats.meta.json").read_text())["n_cached"] == 5
    # --pooling mean: another feature (not served from the last-token cache), recorded in the metadata
    assert cli.main([*argv, "--pooling", "mean", "--dtype", "float32"]) == 0
    meta = json.loads((tmp_path / "out" / "feats.meta.json").read_text())
    assert meta["pooling"] == "mean" and meta["n_cached"] == 0
    ref_mean = embed_texts([r["q"] for r in rows], [r["a"] for r in rows],
                           FeatureConfig(model=str(TINY), max_length=64, pooling="mean"), progress=False)
    np.testing.assert_allclose(np.load(out), ref_mean, atol=1e-6)
    assert not np.allclose(ref_mean, ref, atol=1e-2)


@pytest.mark.parametrize(
    "content, extra, message",
    [
        ('{"prompt": "p"}\n', [], "field 'response' is missing"),
        ('{"text": ""}\n', [], "row 0: field 'text' is empty"),
        ('{"text": "fine"}\n', ["--model", "/nonexistent/model.gguf"], "model path not found"),
        ('{"text": "fine"}\n', ["--max-length", "1"], "invalid option"),
    ],
)
def test_embed_bad_input_exit_2_one_line(tmp_path, embed_only, capsys, content, extra, message):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    argv = ["embed", "--input", str(src), "--model", str(TINY), "--out", str(tmp_path / "o.npy"), "--no-progress",
            *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sotjax embed: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o.npy").exists()
