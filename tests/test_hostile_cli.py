"""A careless or hostile user at the command line: no data loss, no runaway, one line, right exit code.

Every case drives ``sotjax`` in a subprocess (as a user would) and checks the exit code, that stderr
is exactly one line without a traceback, that the user's files are byte-identical afterwards, and
that nothing is left behind. Cases come from the hardening issue (foreign ``--out`` directories,
``--out .``, disk full, YAML alias bombs, hostile JSONL, BOM ids, Ctrl-C, stale staging dirs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import one_line_error, snapshot, sotjax

from sotjax.synthetic import make_problem


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    p = make_problem(n=40, n_safe=8, n_harmful=12, dim=6, seed=5)
    np.save(d / "corpus.npy", p.corpus)
    np.save(d / "safe.npy", p.safe)
    np.save(d / "harmful.npy", p.harmful)
    return d


def weigh_args(d: Path, out, *extra):
    return ["weigh", "--no-progress", "--corpus", d / "corpus.npy", "--safe", d / "safe.npy",
            "--harmful", d / "harmful.npy", "--out", out, "--steps", "3", *extra]


# ----------------------------------------------------------------------------------------- data loss
def test_foreign_directory_with_stats_json_is_never_replaced(inputs, tmp_path):
    project = tmp_path / "thesis"
    project.mkdir()
    (project / "stats.json").write_text('{"mine": true}\n')
    (project / "thesis.tex").write_text("\\documentclass{article}\n")
    before = snapshot(tmp_path)
    line = one_line_error(sotjax(*weigh_args(inputs, project)), 2)
    assert "not a sotjax run directory" in line and str(project) in line
    assert snapshot(tmp_path) == before


def test_old_style_run_without_marker_is_refused(inputs, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("weights.parquet", "selected_ids.npy", "config.json", "stats.json"):
        (out / name).write_bytes(b"user bytes " + name.encode())
    before = snapshot(tmp_path)
    one_line_error(sotjax(*weigh_args(inputs, out)), 2)
    assert snapshot(tmp_path) == before


def test_run_directory_with_an_extra_user_file_is_refused(inputs, tmp_path):
    out = tmp_path / "run"
    assert sotjax(*weigh_args(inputs, out)).returncode == 0
    (out / "notes.txt").write_text("my notes\n")
    before = snapshot(tmp_path)
    line = one_line_error(sotjax(*weigh_args(inputs, out)), 2)
    assert "notes.txt" in line
    assert snapshot(tmp_path) == before


def test_own_run_directory_is_replaced(inputs, tmp_path):
    out = tmp_path / "run"
    assert sotjax(*weigh_args(inputs, out)).returncode == 0
    (out / "eval.md").write_text("# eval\n")  # what `sotjax eval` adds is part of the run
    proc = sotjax(*weigh_args(inputs, out, "--keep", "0.5"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["sot"]["keep"] == 0.5
    assert not (out / "eval.md").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging / old leftovers


def test_out_is_the_input_directory(inputs, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for name in ("corpus.npy", "safe.npy", "harmful.npy"):
        (d / name).write_bytes((inputs / name).read_bytes())
    (d / "stats.json").write_text("{}\n")
    before = snapshot(tmp_path)
    line = one_line_error(sotjax(*weigh_args(d, d)), 2)
    assert "input" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("out", [".", "..", "./"])
def test_out_is_the_current_directory_or_a_parent(inputs, tmp_path, out):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("precious\n")
    before = snapshot(tmp_path)
    line = one_line_error(sotjax(*weigh_args(inputs, out), cwd=work), 2)
    assert "current directory" in line
    assert snapshot(tmp_path) == before


def test_empty_directory_and_new_path_are_accepted(inputs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sotjax(*weigh_args(inputs, empty)).returncode == 0
    assert (empty / ".sotjax-run").is_file()
    nested = tmp_path / "a" / "b" / "run"
    assert sotjax(*weigh_args(inputs, nested)).returncode == 0
    assert (nested / "weights.parquet").is_file()


def test_out_is_an_existing_file(inputs, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x\n")
    line = one_line_error(sotjax(*weigh_args(inputs, f)), 2)
    assert "not a directory" in line
    assert f.read_text() == "x\n"


# ------------------------------------------------------------------------------- disk full, leftovers
_ENOSPC_HOOK = """
import errno, pyarrow.parquet as pq
def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
pq.write_table = _full
"""


def test_disk_full_while_writing_keeps_the_earlier_run(inputs, tmp_path):
    out = tmp_path / "run"
    assert sotjax(*weigh_args(inputs, out)).returncode == 0
    before = snapshot(tmp_path)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_ENOSPC_HOOK)
    before = snapshot(out)
    proc = sotjax(*weigh_args(inputs, out, "--keep", "0.5"), env={"PYTHONPATH": str(hook)})
    line = one_line_error(proc, 1)
    assert str(out) in line and "No space left on device" in line
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hook", "run"]


def test_disk_full_on_a_new_output_leaves_nothing(inputs, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_ENOSPC_HOOK)
    out = tmp_path / "run"
    one_line_error(sotjax(*weigh_args(inputs, out), env={"PYTHONPATH": str(hook)}), 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hook"]


def test_leftovers_of_a_killed_writer_are_cleaned(tmp_path):
    from sotjax.atomic import atomic_directory, clean_leftovers

    target = tmp_path / "run"
    target.mkdir()
    (target / "a").write_text("old run\n")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = dead.stdout.strip()
    stale = tmp_path / ".run.abc.staging"
    stale.mkdir()
    (stale / ".sotjax-owner").write_text(dead_pid)
    live = tmp_path / ".run.def.staging"  # a concurrent writer (this process): left alone
    live.mkdir()
    (live / ".sotjax-owner").write_text(str(os.getpid()))
    foreign = tmp_path / ".run.xyz.staging"  # not ours (no owner file): left alone
    foreign.mkdir()
    assert clean_leftovers(target) == [stale]
    assert live.exists() and foreign.exists() and not stale.exists()
    # a crash between the two renames: the previous run is in .old and the target is missing
    old = tmp_path / ".run.ghi.old"
    old.mkdir()
    (old / ".sotjax-owner").write_text(dead_pid)
    os.replace(target, old / "content")
    clean_leftovers(target)
    assert (target / "a").read_text() == "old run\n" and not old.exists()
    with atomic_directory(target) as stage:
        (stage / "b").write_text("new\n")
    assert sorted(p.name for p in target.iterdir()) == ["b"]


# ---------------------------------------------------------------------------------- hostile configs
def test_yaml_alias_bomb_is_refused_fast(inputs, tmp_path):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i, name in enumerate("bcdefgh"):
        prev = "a" if i == 0 else "bcdefgh"[i - 1]
        lines.append(f"{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]")
    lines.append("lam: [*h,*h,*h,*h,*h,*h,*h,*h,*h]")
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    line = one_line_error(sotjax(*weigh_args(inputs, tmp_path / "run", "--config", cfg)), 2)
    assert time.perf_counter() - t0 < 60
    assert "anchors and aliases" in line and str(cfg) in line
    assert not (tmp_path / "run").exists()


def test_huge_config_value_is_truncated_in_the_message(inputs, tmp_path):
    cfg = tmp_path / "big.yaml"
    cfg.write_text("lam: [" + ", ".join(["[1, 2, 3, 4, 5, 6, 7, 8]"] * 5000) + "]\n")
    line = one_line_error(sotjax(*weigh_args(inputs, tmp_path / "run", "--config", cfg)), 2)
    assert "lam=" in line


@pytest.mark.parametrize("text, needle", [
    ("1: 0.5\n", "field names must be strings"),
    ("true: 1\n", "field names must be strings"),
    ("? [0.5]\n: 1\n", "malformed YAML"),
    ("- lam\n", "expected a mapping"),
    ("lam: [\n", "malformed YAML"),
    ("nonsense_field: 1\n", "unknown field"),
])
def test_bad_config_files(inputs, tmp_path, text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    line = one_line_error(sotjax(*weigh_args(inputs, tmp_path / "run", "--config", cfg)), 2)
    assert needle in line and str(cfg) in line


# ------------------------------------------------------------------------------------- hostile JSONL
def _jsonl_inputs(tmp_path: Path, inputs: Path, first_line: str) -> Path:
    corpus = np.load(inputs / "corpus.npy")
    rows = [first_line] + [json.dumps({"id": f"r{i}", "embedding": v.tolist()}) for i, v in enumerate(corpus[1:])]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("first, needle", [
    ('{"id": "r", "embedding": [' + "9" * 400 + ", 1, 1, 1, 1, 1]}", "too large"),
    ('{"id": "r", "embedding": [' + "9" * 5000 + ", 1, 1, 1, 1, 1]}", "line 1"),
    ('{"id": "r", "embedding": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
])
def test_hostile_jsonl_numbers_and_nesting(inputs, tmp_path, first, needle):
    corpus = _jsonl_inputs(tmp_path, inputs, first)
    args = ["weigh", "--no-progress", "--corpus", corpus, "--safe", inputs / "safe.npy",
            "--harmful", inputs / "harmful.npy", "--out", tmp_path / "run"]
    line = one_line_error(sotjax(*args), 2)
    assert needle in line and str(corpus) in line
    assert not (tmp_path / "run").exists()


def test_reader_refuses_devices_and_fifos(inputs, tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    for src in (fifo, Path("/dev/zero")):
        args = ["weigh", "--no-progress", "--corpus", src, "--safe", inputs / "safe.npy",
                "--harmful", inputs / "harmful.npy", "--out", tmp_path / "run"]
        line = one_line_error(sotjax(*args, timeout=60), 2)
        assert "not a regular file" in line


def test_jsonl_line_cap(tmp_path):
    from sotjax.errors import SotjaxInputError
    from sotjax.io import iter_jsonl

    path = tmp_path / "long.jsonl"
    path.write_text('{"id": "a", "embedding": [1, 2]}\n{"x": "' + "y" * 5000 + '"}\n')
    with pytest.raises(SotjaxInputError, match="line 2: longer than 1000 bytes"):
        list(iter_jsonl(path, max_line_bytes=1000))


def test_ids_file_with_byte_order_mark(inputs, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"\xef\xbb\xbf" + "\n".join(f"doc-{i}" for i in range(40)).encode() + b"\n")
    out = tmp_path / "run"
    proc = sotjax(*weigh_args(inputs, out, "--ids", ids))
    assert proc.returncode == 0, proc.stderr
    import pyarrow.parquet as pq

    assert pq.read_table(out / "weights.parquet").column("id").to_pylist()[0] == "doc-0"


# ----------------------------------------------------------------------------------- interruption
def test_ctrl_c_during_a_fit_exits_130_and_writes_nothing(tmp_path):
    p = make_problem(n=2000, n_safe=20, n_harmful=300, dim=16, seed=1)
    for name in ("corpus", "safe", "harmful"):
        np.save(tmp_path / f"{name}.npy", getattr(p, name))
    cfg = tmp_path / "long.yaml"  # no early stop: the fit runs until interrupted
    cfg.write_text("objective_tol: 0\nweight_tol: 0\nsteps: 100000\n")
    out = tmp_path / "run"
    args = ["weigh", "--no-progress", "--corpus", tmp_path / "corpus.npy", "--safe", tmp_path / "safe.npy",
            "--harmful", tmp_path / "harmful.npy", "--out", out, "--config", cfg]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for delay in (7.0, 9.0):
        proc = subprocess.Popen([sys.executable, "-m", "sotjax.cli", *map(str, args)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, err[-2000:]
        assert proc.returncode == 130, (proc.returncode, err[-2000:])
        assert "interrupted" in err
        assert not out.exists()
        assert sorted(x.name for x in tmp_path.iterdir()) == ["corpus.npy", "harmful.npy", "long.yaml", "safe.npy"]


# ------------------------------------------------------------------------------------------ eval
def test_eval_refuses_pickled_embeddings_and_foreign_dirs(inputs, tmp_path):
    out = tmp_path / "run"
    assert sotjax(*weigh_args(inputs, out)).returncode == 0
    ids = [f"{i}" for i in range(40)]
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": i, "label": "benign" if int(i) % 2 else "harmful"}) + "\n"
                              for i in ids))
    # embeddings.npz with an object array: refused without unpickling, one line
    bad = out / "embeddings.npz"
    np.savez(bad, corpus=np.array([{"a": 1}] * 40, dtype=object), safe=np.zeros((2, 2)), harmful=np.zeros((2, 2)))
    line = one_line_error(sotjax("eval", out, "--labels", labels, "--no-write"), 2)
    assert "pickled" in line
    bad.unlink()
    # a directory sotjax did not write: eval does not write into it
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.parquet").write_bytes((out / "weights.parquet").read_bytes())
    before = snapshot(foreign)
    line = one_line_error(sotjax("eval", foreign, "--labels", labels, "--no-baselines"), 2)
    assert "--no-write" in line
    assert snapshot(foreign) == before
    proc = sotjax("eval", foreign, "--labels", labels, "--no-baselines", "--no-write")
    assert proc.returncode == 0 and "AUROC" in proc.stdout and snapshot(foreign) == before
    # its own run: eval.json / eval.md added, and a later weigh may still replace the run
    assert sotjax("eval", out, "--labels", labels, "--no-baselines").returncode == 0
    assert (out / "eval.json").is_file()
    assert sotjax(*weigh_args(inputs, out)).returncode == 0


# ------------------------------------------------------------------------------ text inputs + cache
def test_weigh_text_inputs_with_cache_dir_writes_the_run(tmp_path):
    """Used to embed and fit, then crash writing config.json (a Path in the feature config)."""
    tiny = Path(__file__).parent / "fixtures" / "tiny_llama"
    rng = np.random.default_rng(0)
    words = ["bread", "flour", "oven", "water", "salt", "yeast", "crust", "dough"]

    def write(path: Path, n: int, prefix: str) -> Path:
        rows = [{"id": f"{prefix}{i}", "prompt": " ".join(rng.choice(words, 5)),
                 "response": " ".join(rng.choice(words, 7))} for i in range(n)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    corpus, safe, harmful = write(tmp_path / "c.jsonl", 12, "c"), write(tmp_path / "s.jsonl", 4, "s"), \
        write(tmp_path / "h.jsonl", 4, "h")
    out, cache = tmp_path / "run", tmp_path / "cache"
    proc = sotjax("weigh", "--no-progress", "--corpus", corpus, "--safe", safe, "--harmful", harmful, "--out", out,
                  "--model", tiny, "--max-length", "32", "--cache-dir", cache, "--steps", "3", "--pooling", "mean",
                  "--layer", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    features = config["inputs"]["corpus"]["features"]
    assert features["cache_dir"] == str(cache) and features["pooling"] == "mean" and features["layer"] == 1
    assert any(cache.iterdir())


def test_compilation_cache_is_written_under_the_cache_root(inputs, tmp_path):
    root = tmp_path / "cache"
    proc = sotjax(*weigh_args(inputs, tmp_path / "run"), env={"SOTJAX_CACHE": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any((root / "jax").iterdir())
    off = tmp_path / "cache-off"
    env = {"SOTJAX_CACHE": str(off), "SOTJAX_COMPILATION_CACHE": "0"}
    proc = sotjax(*weigh_args(inputs, tmp_path / "run2"), env=env)
    assert proc.returncode == 0 and not (off / "jax").exists()


# ------------------------------------------------------------------------------------ memory plan
def test_plan_is_recorded_and_an_over_budget_problem_is_refused_up_front(inputs, tmp_path):
    out = tmp_path / "run"
    assert sotjax(*weigh_args(inputs, out, "--memory-budget", "4GiB")).returncode == 0
    plan = json.loads((out / "stats.json").read_text())["plan"]
    assert plan["kind"] == "dense" and plan["budget_bytes"] == 4 << 30 and plan["block_rows"] is None
    assert 0 < plan["estimated_bytes"] <= plan["budget_bytes"] and plan["sharded_devices"] == 1
    line = one_line_error(sotjax(*weigh_args(inputs, tmp_path / "tiny", "--memory-budget", "1KiB")), 2)
    assert "--memory-budget" in line and not (tmp_path / "tiny").exists()
    line = one_line_error(sotjax(*weigh_args(inputs, tmp_path / "x", "--memory-budget", "lots")), 2)
    assert "--memory-budget" in line
