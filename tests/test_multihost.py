"""Two real processes on localhost (``jax.distributed``, 2 CPU devices each) run one fit over a
4-device mesh: each process reads only its own rows of the memory-mapped corpus, and the weights are
the single-process weights (dense and streamed plans, float64). The same through the real CLI
(``sotjax weigh --coordinator/--num-processes/--process-id``): one run directory, written by process 0,
with the single-process run's weights; an error in one process's rows stops both at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import free_port, jax_child_env, run_together

WORKER = textwrap.dedent('''
    import json, sys
    import jax
    import numpy as np
    from sotjax import distributed as dist, learn
    from sotjax.config import SOTConfig

    port, pid, folder, plan = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.config.update("jax_num_cpu_devices", 2)
    dist.initialize(dist.DistributedConfig(f"127.0.0.1:{port}", 2, pid), timeout_s=60,
                    heartbeat_timeout_s=20, shutdown_timeout_s=30)
    corpus = np.load(f"{folder}/corpus.npy", mmap_mode="r")
    read = []
    class Spy:                          # records which rows this process reads
        shape, dtype, ndim = corpus.shape, corpus.dtype, corpus.ndim
        def __getitem__(self, index):
            read.append([index.start, index.stop] if isinstance(index, slice) else str(index))
            return corpus[index]
        def __array__(self, *args, **kwargs):
            raise AssertionError("the whole corpus was read")
    safe, harmful = np.load(f"{folder}/safe.npy"), np.load(f"{folder}/harmful.npy")
    cfg = SOTConfig.entropic(0.03).replace(plan=plan, steps=25, dtype="float64")
    res = learn.fit(Spy(), safe, harmful, cfg)
    out = {"read": read, "devices": len(jax.devices()), "plan": res.plan.to_dict(), "steps": res.n_steps,
           "weights": res.weights.tolist(), "writer": dist.is_writer()}
    with open(f"{folder}/process{pid}.json", "w") as handle:
        json.dump(out, handle)
''')


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multihost")
    rng = np.random.default_rng(3)
    n, d = 101, 12                     # 101 rows: process 1's block ends in padding
    x = rng.normal(size=(n, d))
    x[:10] -= 1.5
    np.save(folder / "corpus.npy", x.astype(np.float32))
    np.save(folder / "safe.npy", (rng.normal(size=(6, d)) + 1.0).astype(np.float32))
    np.save(folder / "harmful.npy", (rng.normal(size=(25, d)) - 1.5).astype(np.float32))
    return folder


@pytest.mark.parametrize("plan", ["dense", "stream"])
def test_two_processes_give_the_single_process_weights(data, plan, tmp_path):
    import sotjax

    folder = tmp_path
    for name in ("corpus", "safe", "harmful"):
        (folder / f"{name}.npy").write_bytes((data / f"{name}.npy").read_bytes())
    script = folder / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    runs = run_together([[sys.executable, str(script), str(port), str(i), str(folder), plan] for i in range(2)],
                        [jax_child_env()] * 2, timeout=240)
    for i, r in enumerate(runs):
        assert r.returncode == 0, f"process {i} exited {r.returncode}:\n{(r.stdout + r.stderr)[-3000:]}"
    info = [json.loads((folder / f"process{i}.json").read_text()) for i in range(2)]
    assert [i["devices"] for i in info] == [4, 4] and [i["writer"] for i in info] == [True, False]
    pad = info[0]["plan"]["padded_rows"]
    assert pad % 4 == 0 and pad >= 101 and info[0]["plan"]["sharded_devices"] == 4
    # each process read its own contiguous rows of the corpus and nothing else (beyond a 2-row probe)
    blocks = [[r for r in i["read"] if r != [None, 2]] for i in info]
    assert blocks == [[[0, pad // 2]], [[pad // 2, 101]]], info[0]["read"]

    x, s, h = (np.load(folder / f"{name}.npy") for name in ("corpus", "safe", "harmful"))
    # float64: this small problem's float32 fit is sensitive to the order of reductions (4 simulated
    # devices in one process differ from 1 device by 0.06 in L1 there, float64 by 5e-10)
    single = sotjax.fit(x, s, h, sotjax.SOTConfig.entropic(0.03).replace(plan=plan, steps=25, dtype="float64"))
    for i in info:
        w = np.asarray(i["weights"])
        assert i["steps"] == single.n_steps
        assert np.abs(w - single.weights).sum() <= 1e-8 * single.weights.sum()
    assert single.weights[:10].mean() < 0.5 * single.weights[10:].mean()


# ------------------------------------------------------------------------------------ the real CLI
# converges after 10 steps (dw 1.9e-3, far from the tolerances: both runs stop at the same step)
CLI_FLAGS = ("--plan", "dense", "--dtype", "float64", "--epsilon", "0.03", "--steps", "25", "--objective-tol",
             "1e-4", "--weight-tol", "1e-2", "--no-progress")


def _weigh(folder: Path, corpus: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sotjax.cli", "weigh", "--corpus", str(folder / corpus),
            "--safe", str(folder / "safe.npy"), "--harmful", str(folder / "harmful.npy"), "--out", str(out),
            *CLI_FLAGS, *extra]


def _process_env() -> dict[str, str]:
    return {**jax_child_env(), "JAX_NUM_CPU_DEVICES": "2"}   # 2 CPU devices per process: a 4-device mesh


def _pair(folder: Path, corpus: str, outs: tuple[Path, Path]) -> list[list[str]]:
    coordinator = f"127.0.0.1:{free_port()}"
    return [_weigh(folder, corpus, outs[i], "--coordinator", coordinator, "--num-processes", "2",
                   "--process-id", str(i)) for i in range(2)]


def _other_output(proc: subprocess.CompletedProcess) -> list[str]:
    """stdout lines besides Gloo's own connection lines (JAX's CPU collectives print them; Gloo's
    threads sometimes split one of them, so a fragment without the ``[Gloo]`` prefix can stand alone)."""
    return [line for line in proc.stdout.splitlines()
            if line.strip() and not line.startswith("[Gloo]") and "peer ranks" not in line]


def test_two_cli_processes_write_one_run_with_the_single_process_weights(data, tmp_path):
    import pyarrow.parquet as pq

    for name in ("corpus", "safe", "harmful"):
        (tmp_path / f"{name}.npy").write_bytes((data / f"{name}.npy").read_bytes())
    # each process gets its own --out (on one host they would otherwise share it): only process 0's appears
    outs = (tmp_path / "run0", tmp_path / "run1")
    single_out = tmp_path / "single"
    before = set(os.listdir(tmp_path))
    p0, p1, single = run_together([*_pair(tmp_path, "corpus.npy", outs), _weigh(tmp_path, "corpus.npy", single_out)],
                              [_process_env(), _process_env(), jax_child_env()])
    for i, p in enumerate((p0, p1, single)):
        assert p.returncode == 0 and not p.stderr.strip(), (i, p.returncode, p.stderr[-3000:], p.stdout[-2000:])
    assert set(os.listdir(tmp_path)) - before == {"run0", "single"}
    files = {".sotjax-run", "conditioning.npz", "weights.parquet", "selected_ids.npy", "config.json", "stats.json"}
    assert set(os.listdir(outs[0])) == files == set(os.listdir(single_out))
    assert _other_output(p0)[0].startswith("sotjax weigh: converged") and "wrote" in _other_output(p0)[-1]
    assert _other_output(p1) == [f"sotjax weigh: process 1 of 2 finished (process 0 wrote {outs[1]})"]

    w = pq.read_table(outs[0] / "weights.parquet").to_pydict()
    ref = pq.read_table(single_out / "weights.parquet").to_pydict()
    assert w["id"] == ref["id"] == [str(i) for i in range(101)] and w["rank"] == ref["rank"]
    w_multi, w_single = np.asarray(w["weight"]), np.asarray(ref["weight"])
    assert np.abs(w_multi - w_single).sum() <= 1e-8 * w_single.sum()
    assert w["selected"] == ref["selected"]
    stats, single_stats = (json.loads((d / "stats.json").read_text()) for d in (outs[0], single_out))
    assert stats["plan"]["sharded_devices"] == 4 and single_stats["plan"]["sharded_devices"] == 1
    assert len(stats["devices"]) == 4 and stats["n_steps"] == single_stats["n_steps"]
    config, single_config = (json.loads((d / "config.json").read_text()) for d in (outs[0], single_out))
    assert config["inputs"] == single_config["inputs"]          # paths and SHA-256 of every input


def test_an_error_in_one_process_rows_stops_both_processes(data, tmp_path):
    from cli_helpers import one_line_error

    x = np.load(data / "corpus.npy")
    x[80, 3] = np.nan                   # rows [52, 101) of the 104 padded rows belong to process 1
    np.save(tmp_path / "bad.npy", x)
    for name in ("safe", "harmful"):
        (tmp_path / f"{name}.npy").write_bytes((data / f"{name}.npy").read_bytes())
    out = tmp_path / "run"
    start = time.monotonic()
    p0, p1 = run_together(_pair(tmp_path, "bad.npy", (out, out)), [_process_env(), _process_env()], timeout=90)
    elapsed = time.monotonic() - start
    line1 = one_line_error(p1, 2, "weigh")
    assert f"{tmp_path / 'bad.npy'}: non-finite value (NaN or inf) in row 80" in line1
    assert "process 1 of 2 stopped with an error" in one_line_error(p0, 2, "weigh")
    assert not out.exists() and not _other_output(p0) and not _other_output(p1)
    assert elapsed < 60, elapsed          # both stopped together, none waited for a timeout


def test_a_process_of_several_maps_npy_inputs_and_refuses_text(data, tmp_path):
    from sotjax import pipeline
    from sotjax.errors import SotjaxInputError

    x, ids = pipeline._open_set(data / "corpus.npy", None)
    assert isinstance(x, np.memmap) and x.shape == (101, 12) and ids is None   # rows paged in by fit, per process
    text = tmp_path / "texts.jsonl"
    text.write_text('{"prompt": "hi", "response": "hello"}\n')
    with pytest.raises(SotjaxInputError, match="embed text first with `sotjax embed`"):
        pipeline._open_set(text, None)


@pytest.mark.parametrize(("flags", "env", "message"), [
    (["--num-processes", "2"], {}, "go together (all or none); missing --coordinator/SOTJAX_COORDINATOR"),
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], {}, "must be HOST:PORT"),
    (["--coordinator", "127.0.0.1:5", "--num-processes", "2", "--process-id", "2"], {},
     "--process-id must be in [0, 2) for --num-processes 2, got 2"),
    ([], {"SOTJAX_NUM_PROCESSES": "two"}, "SOTJAX_NUM_PROCESSES must be an integer, got 'two'"),
])
def test_bad_process_flags_fail_in_one_line_before_joining(data, tmp_path, monkeypatch, capsys, flags, env, message):
    from sotjax import cli

    for var in ("SOTJAX_COORDINATOR", "SOTJAX_NUM_PROCESSES", "SOTJAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    args = ["weigh", "--corpus", str(data / "corpus.npy"), "--safe", str(data / "safe.npy"),
            "--harmful", str(data / "harmful.npy"), "--out", str(tmp_path / "run"), *flags]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sotjax weigh: error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "run").exists()
