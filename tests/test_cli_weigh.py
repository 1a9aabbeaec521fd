"""`sotjax weigh` end to end: outputs, and every bad input -> exit 2, one line naming it, no output."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sotjax.cli import main
from sotjax.synthetic import make_problem


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("sets")
    p = make_problem(n=60, n_safe=10, n_harmful=20, dim=8, seed=3)
    np.save(d / "corpus.npy", p.corpus)
    np.save(d / "corpus.ids.npy", np.array([f"doc-{i}" for i in range(60)]))
    np.save(d / "safe.npy", p.safe)
    np.save(d / "harmful.npy", p.harmful)
    return d, p


def run_cli(args, capsys):
    code = main(["weigh", "--no-progress", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_weigh_writes_complete_run_directory(sets, tmp_path, capsys):
    d, p = sets
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["--corpus", d / "corpus.npy", "--safe", d / "safe.npy",
                               "--harmful", d / "harmful.npy", "--out", out, "--keep", "0.75"], capsys)
    assert code == 0, stdout
    assert sorted(x.name for x in out.iterdir()) == [".sotjax-run", "conditioning.npz", "config.json",
                                                     "selected_ids.npy", "stats.json", "weights.parquet"]
    marker = json.loads((out / ".sotjax-run").read_text())
    assert marker["format"] == "sotjax-run" and marker["kind"] == "weigh"
    assert sorted(marker["files"]) == ["conditioning.npz", "config.json", "selected_ids.npy", "stats.json",
                                       "weights.parquet"]
    table = pq.read_table(out / "weights.parquet").to_pandas()
    assert list(table.columns) == ["id", "weight", "logit", "rank", "selected", "train_weight"]
    assert table["id"].tolist() == [f"doc-{i}" for i in range(60)]
    assert table["selected"].sum() == 45
    assert np.isclose(table["weight"].sum(), 1.0)
    assert np.isclose(table.loc[table.selected, "train_weight"].mean(), 1.0)
    assert (table.loc[~table.selected, "train_weight"] == 0).all()
    assert sorted(table["rank"]) == list(range(60))
    kept = np.load(out / "selected_ids.npy")
    assert kept.tolist() == table.sort_values("rank")["id"].tolist()[:45]
    # the harmful block (last 6 rows) is dropped
    assert not table["selected"][p.is_harmful].any()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["shapes"] == {"n": 60, "dim": 8, "n_safe": 10, "n_harmful": 20}
    assert len(stats["objective"]) == stats["n_steps"] == len(stats["sinkhorn_iterations"]["harmful"])
    assert len(stats["sinkhorn_error"]["safe"]) == stats["n_steps"] == len(stats["adjoint_converged"])
    assert max(stats["sinkhorn_error"]["harmful"]) <= 1e-4 and all(stats["adjoint_converged"])
    assert {"setup", "compile", "optimize", "total"} <= set(stats["timings_s"])
    config = json.loads((out / "config.json").read_text())
    assert config["sot"]["keep"] == 0.75 and len(config["inputs"]["corpus"]["sha256"]) == 64


def test_weigh_reads_jsonl_and_parquet_and_yaml(sets, tmp_path, capsys):
    d, p = sets
    corpus_jsonl = tmp_path / "corpus.jsonl"
    corpus_jsonl.write_text("".join(json.dumps({"id": f"r{i}", "embedding": v.tolist()}) + "\n"
                                    for i, v in enumerate(p.corpus)))
    pq.write_table(pa.table({"embedding": [v.tolist() for v in p.safe]}), tmp_path / "safe.parquet")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("lam: 0.5\nsteps: 5\nkeep_count: 10\n")
    out = tmp_path / "run"
    code, stdout, err = run_cli(["--corpus", corpus_jsonl, "--safe", tmp_path / "safe.parquet",
                                 "--harmful", d / "harmful.npy", "--out", out, "--config", cfg,
                                 "--steps", "7"], capsys)
    assert code == 0, err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["n_steps"] <= 7 and stats["selection"]["keep_count"] == 10
    assert pq.read_table(out / "weights.parquet").column("id").to_pylist()[:2] == ["r0", "r1"]


def _bad(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return path


BAD_CASES = {
    "dimension mismatch": (lambda t, d: ["--safe", _bad(t, "s.npy", np.ones((4, 3), np.float32))],
                           "embedding dimension 3 does not match"),
    "nan": (lambda t, d: ["--corpus", _bad(t, "c.npy", np.where(np.eye(5, 8) > 0, np.nan, 1.0))],
            "non-finite value"),
    "inf": (lambda t, d: ["--harmful", _bad(t, "h.npy", np.full((3, 8), np.inf))], "non-finite value"),
    "empty set": (lambda t, d: ["--safe", _bad(t, "s.npy", np.zeros((0, 8), np.float32))], "empty set"),
    "n < 2": (lambda t, d: ["--corpus", _bad(t, "c.npy", np.ones((1, 8), np.float32))], "at least 2"),
    "zero row": (lambda t, d: ["--corpus", _bad(t, "c.npy", np.zeros((4, 8), np.float32))], "zero vector"),
    "K > n": (lambda t, d: ["--keep-count", "61"], "keep_count=61"),
    "K < 1": (lambda t, d: ["--keep-count", "0"], "keep_count=0"),
    "lambda": (lambda t, d: ["--lam", "1.5"], "lam=1.5"),
    "epsilon": (lambda t, d: ["--epsilon", "0"], "epsilon=0.0"),
    "missing file": (lambda t, d: ["--harmful", t / "nope.npy"], "nope.npy: no such file"),
    "not an array": (lambda t, d: ["--safe", (t / "s.npy").write_bytes(b"garbage") and t / "s.npy"],
                     "not a readable .npy"),
    "directory": (lambda t, d: ["--safe", t], "not a dataset directory"),
    "1-D array": (lambda t, d: ["--safe", _bad(t, "s.npy", np.ones(8, np.float32))], "2-D array"),
    "malformed jsonl": (lambda t, d: ["--safe", (t / "s.jsonl").write_text(
        '{"embedding": [1,2,3,4,5,6,7,8]}\n\n{"embedding": [1,2,3,4,5,6,7,8]\n') and t / "s.jsonl"],
        "s.jsonl: line 3: malformed JSON"),
    "missing field": (lambda t, d: ["--safe", (t / "s.jsonl").write_text('{"emb": [1]}\n') and t / "s.jsonl"],
                      "s.jsonl: field 'embedding' is missing and neither field 'prompt' nor 'text'"),
    "ragged jsonl": (lambda t, d: ["--safe", (t / "s.jsonl").write_text(
        '{"embedding": [1, 2]}\n{"embedding": [1, 2, 3]}\n') and t / "s.jsonl"], "line 2: 'embedding' has 3 values"),
    "duplicate ids": (lambda t, d: ["--ids", (t / "ids.txt").write_text("a\nb\n" + "c\n" * 58) and t / "ids.txt"],
                      "duplicate id 'c'"),
    "ids count": (lambda t, d: ["--ids", (t / "ids.txt").write_text("a\nb\n") and t / "ids.txt"], "2 ids for 60 rows"),
    "bad yaml": (lambda t, d: ["--config", (t / "c.yaml").write_text("lam: [\n") and t / "c.yaml"], "malformed YAML"),
    "unknown yaml field": (lambda t, d: ["--config", (t / "c.yaml").write_text("lambda: 1\n") and t / "c.yaml"],
                           "unknown field(s) lambda"),
    "csv without text fields": (lambda t, d: ["--safe", (t / "s.csv").write_text("a,b\n1,2\n") and t / "s.csv"],
                                "s.csv: field 'embedding' is missing and neither field 'prompt' nor 'text'"),
    "ids with text input": (lambda t, d: ["--corpus", (t / "c.jsonl").write_text('{"text": "hi"}\n') and t / "c.jsonl",
                                          "--ids", (t / "i.txt").write_text("a\n") and t / "i.txt"],
                            "only used with a .npy input"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_exits_2_with_one_line_and_no_output(case, sets, tmp_path, capsys):
    d, _ = sets
    make_override, message = BAD_CASES[case]
    override = make_override(tmp_path, d)
    base = {"--corpus": d / "corpus.npy", "--safe": d / "safe.npy", "--harmful": d / "harmful.npy"}
    extra = []
    for flag, value in zip(override[::2], override[1::2], strict=True):
        if flag in base:
            base[flag] = value
        else:
            extra += [flag, value]
    out = tmp_path / "out"
    args = [x for kv in base.items() for x in kv] + ["--out", out] + extra
    code, stdout, err = run_cli(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert lines[0].startswith("sotjax weigh: error: ")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging left


def test_weigh_embeds_text_inputs(tmp_path, capsys):
    """Text records (no embedding field) are embedded with the chosen model before weighing."""
    topics = ["How do I sort a list in Python?", "What is the capital of France?", "Recommend a good book.",
              "How do I reset my router?", "Explain photosynthesis briefly.", "What time zone is Tokyo in?"]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"c{i}", "prompt": q, "response": "Sure, here is how."}) + "\n"
                              for i, q in enumerate(topics * 2)))
    safe = tmp_path / "safe.csv"
    safe.write_text("prompt,response\n" + "".join(f"{q},Happy to help.\n" for q in topics[:3]))
    harmful = tmp_path / "harmful.jsonl"  # benign stand-ins: the test is about the plumbing
    harmful.write_text("".join(json.dumps({"text": f"Unrelated note number {i} about gardening."}) + "\n"
                               for i in range(4)))
    out = tmp_path / "run"
    code, stdout, err = run_cli(["--corpus", corpus, "--safe", safe, "--harmful", harmful, "--out", out,
                                 "--model", "minilm", "--steps", "5"], capsys)
    assert code == 0, err
    table = pq.read_table(out / "weights.parquet")
    assert table.column("id").to_pylist() == [f"c{i}" for i in range(12)]
    config = json.loads((out / "config.json").read_text())
    assert config["inputs"]["corpus"]["kind"] == "text"
    assert config["inputs"]["corpus"]["features"]["model"] == "minilm"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["shapes"] == {"n": 12, "dim": 384, "n_safe": 3, "n_harmful": 4}


def test_refuses_to_replace_a_foreign_directory(sets, tmp_path, capsys):
    d, _ = sets
    (tmp_path / "mine.txt").write_text("precious")
    code, _, err = run_cli(["--corpus", d / "corpus.npy", "--safe", d / "safe.npy", "--harmful",
                            d / "harmful.npy", "--out", tmp_path], capsys)
    assert code == 2 and "not a sotjax run directory" in err
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_real_process_exit_code_and_input_untouched(sets, tmp_path):
    d, _ = sets
    before = (d / "corpus.npy").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "sotjax.cli", "weigh", "--corpus", str(d / "corpus.npy"),
                           "--safe", str(d / "safe.npy"), "--harmful", str(d / "harmful.npy"),
                           "--out", str(tmp_path / "o"), "--lam", "2"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "sotjax weigh: error: lam=2.0: must be <= 1.0"
    assert "Traceback" not in proc.stderr
    assert (d / "corpus.npy").read_bytes() == before
