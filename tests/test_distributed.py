"""Multi-process building blocks (sotjax.distributed): config, row ranges, and two real processes.

The two-process test starts two Python processes on localhost that join one run through
``jax.distributed`` (CPU, Gloo collectives, 2 devices each), each memory-maps only its own rows of
a ``.npy`` file, and computes column log-sum-exps (``shard_map`` + ``pmax``/``psum`` across the
processes), a row softmax and a global softmax over rows; the results must match float64 NumPy on
the full array, and only process 0 writes.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from cli_helpers import free_port, jax_child_env, run_together

from sotjax import distributed as dist
from sotjax.errors import SotjaxInputError, SotjaxRuntimeError

# ------------------------------------------------------------------------------------ configuration


def test_config_all_none_is_single_process():
    cfg = dist.DistributedConfig()
    assert not cfg.is_multi_process
    dist.initialize(cfg)  # a no-op: nothing started
    one = dist.DistributedConfig("127.0.0.1:1234", 1, 0)
    assert not one.is_multi_process
    assert dist.DistributedConfig("10.0.0.1:1234", 4, 3).address == ("10.0.0.1", 1234)
    assert dist.DistributedConfig("[::1]:80", 2, 0).address == ("::1", 80)


@pytest.mark.parametrize(("args", "message"), [
    (("host:1", 2, None), "--coordinator, --num-processes and --process-id go together (all or none); "
                          "missing --process-id"),
    ((None, 2, 0), "missing --coordinator"),
    (("host", 2, 0), "--coordinator must be HOST:PORT"),
    ((":123", 2, 0), "--coordinator must be HOST:PORT"),
    (("host:http", 2, 0), "--coordinator must be HOST:PORT"),
    (("host:0", 2, 0), "--coordinator: port must be in [1, 65535], got 0"),
    (("host:70000", 2, 0), "--coordinator: port must be in [1, 65535], got 70000"),
    (("host:1", 0, 0), "--num-processes must be >= 1, got 0"),
    (("host:1", 2, 2), "--process-id must be in [0, 2) for --num-processes 2, got 2"),
    (("host:1", 2, -1), "--process-id must be in [0, 2)"),
    (("host:1", True, 0), "--num-processes must be an integer"),
])
def test_config_errors_are_one_line_naming_the_flag(args, message):
    with pytest.raises(SotjaxInputError) as info:
        dist.DistributedConfig(*args)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_from_env_reads_sotjax_variables_and_names_them():
    env = {"SOTJAX_COORDINATOR": "h:99", "SOTJAX_NUM_PROCESSES": " 3 ", "SOTJAX_PROCESS_ID": "2"}
    assert dist.DistributedConfig.from_env(env) == dist.DistributedConfig("h:99", 3, 2)
    assert dist.DistributedConfig.from_env({}) == dist.DistributedConfig()
    assert dist.DistributedConfig.from_env({"SOTJAX_PROCESS_ID": ""}) == dist.DistributedConfig()
    with pytest.raises(SotjaxInputError, match=r"^SOTJAX_NUM_PROCESSES must be an integer, got 'two'$"):
        dist.DistributedConfig.from_env({**env, "SOTJAX_NUM_PROCESSES": "two"})
    with pytest.raises(SotjaxInputError, match=r"^SOTJAX_PROCESS_ID must be in \[0, 3\) for SOTJAX_NUM_PROCESSES 3"):
        dist.DistributedConfig.from_env({**env, "SOTJAX_PROCESS_ID": "3"})
    with pytest.raises(SotjaxInputError, match=r"^SOTJAX_COORDINATOR must be HOST:PORT"):
        dist.DistributedConfig.from_env({**env, "SOTJAX_COORDINATOR": "nohost"})
    with pytest.raises(SotjaxInputError, match=r"^SOTJAX_COORDINATOR, SOTJAX_NUM_PROCESSES and "
                                               r"--process-id/SOTJAX_PROCESS_ID go together \(all or none\); "
                                               r"missing --process-id/SOTJAX_PROCESS_ID$"):
        dist.DistributedConfig.from_env({"SOTJAX_COORDINATOR": "h:1", "SOTJAX_NUM_PROCESSES": "2"})


def test_jax_coordinator_variable_is_a_fallback_only_with_a_process_count():
    # JAX reads JAX_COORDINATOR_ADDRESS itself (and has no JAX_NUM_PROCESSES / JAX_PROCESS_ID)
    jax_env = {"JAX_COORDINATOR_ADDRESS": "10.1.1.1:4000"}
    assert dist.DistributedConfig.from_env(jax_env) == dist.DistributedConfig()
    env = {**jax_env, "SOTJAX_NUM_PROCESSES": "2", "SOTJAX_PROCESS_ID": "1"}
    assert dist.DistributedConfig.from_env(env) == dist.DistributedConfig("10.1.1.1:4000", 2, 1)
    assert dist.DistributedConfig.from_env({**env, "SOTJAX_COORDINATOR": "h:5"}).coordinator == "h:5"
    with pytest.raises(SotjaxInputError, match=r"^JAX_COORDINATOR_ADDRESS must be HOST:PORT"):
        dist.DistributedConfig.from_env({**env, "JAX_COORDINATOR_ADDRESS": "bad"})


def test_resolve_flags_win_field_by_field():
    env = {"SOTJAX_COORDINATOR": "h:1", "SOTJAX_NUM_PROCESSES": "4", "SOTJAX_PROCESS_ID": "3"}
    cfg = dist.DistributedConfig.resolve(coordinator="g:2", process_id=0, environ=env)
    assert cfg == dist.DistributedConfig("g:2", 4, 0)
    assert dist.DistributedConfig.resolve(environ={}) == dist.DistributedConfig()
    with pytest.raises(SotjaxInputError, match=r"^--process-id must be in \[0, 4\) for SOTJAX_NUM_PROCESSES 4"):
        dist.DistributedConfig.resolve(process_id=4, environ=env)


def test_initialize_refuses_a_busy_port_before_jax_crashes_on_it():
    # JAX segfaults when process 0's coordinator port is taken: checked first
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        busy = rf"^--coordinator 127.0.0.1:{port}: port {port} is already in use on this host"
        with pytest.raises(SotjaxRuntimeError, match=busy):
            dist.initialize(dist.DistributedConfig(f"127.0.0.1:{port}", 2, 0), timeout_s=1)


def test_initialize_without_a_coordinator_is_one_line_not_an_abort():
    # JAX aborts the process (SIGABRT) when the coordinator never answers: checked first, bounded
    port = free_port()
    start = time.monotonic()
    silent = rf"^--coordinator 127.0.0.1:{port}: no coordinator answered within 1 s"
    with pytest.raises(SotjaxRuntimeError, match=silent):
        dist.initialize(dist.DistributedConfig(f"127.0.0.1:{port}", 2, 1), timeout_s=1)
    assert time.monotonic() - start < 10


def test_initialize_after_a_jax_call_is_one_line(tmp_path):
    # in a child: JAX refuses initialize once a backend exists (and a real initialize must not
    # start in the test process itself)
    code = textwrap.dedent(f'''
        import jax
        from sotjax import distributed as dist
        jax.devices()
        try:
            dist.initialize(dist.DistributedConfig("127.0.0.1:{free_port()}", 2, 0), timeout_s=5)
        except Exception as err:
            print(type(err).__name__ + ": " + str(err))
    ''')
    done = subprocess.run([sys.executable, "-c", code], env=jax_child_env(), capture_output=True, text=True,
                          timeout=60)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and len(lines) == 1, done.stdout + done.stderr
    assert lines[0].startswith("SotjaxRuntimeError: --coordinator 127.0.0.1:")
    assert "jax.distributed.initialize failed (jax.distributed.initialize() must be called before" in lines[0]


# ------------------------------------------------------------------------------------ rows per process


@pytest.mark.parametrize(("n", "count", "multiple", "expected"), [
    (10, 1, 1, [(0, 10)]),
    (10, 2, 1, [(0, 5), (5, 10)]),
    (10, 3, 1, [(0, 4), (4, 8), (8, 10)]),        # blocks of ceil(10/3) = 4; padding at the end
    (10, 4, 1, [(0, 3), (3, 6), (6, 9), (9, 10)]),
    (13, 2, 2, [(0, 8), (8, 13)]),                # ceil(13/2) = 7 -> 8 (2 devices per process)
    (13, 2, 8, [(0, 8), (8, 13)]),
    (5, 2, 8, [(0, 5), (5, 5)]),                  # process 1 holds only padding
    (1, 3, 1, [(0, 1), (1, 1), (1, 1)]),
    (0, 2, 1, [(0, 0), (0, 0)]),
])
def test_process_row_range(n, count, multiple, expected):
    per = dist.rows_per_process(n, count, multiple)
    ranges = [dist.process_row_range(n, p, count, multiple) for p in range(count)]
    assert ranges == expected
    assert per % multiple == 0 and per * count >= n
    assert [stop - start for start, stop in ranges] == [min(per, max(0, n - p * per)) for p in range(count)]


def test_process_row_range_with_a_fixed_padded_total():
    # e.g. sotjax.plan.padded_rows(n=100, devices=4, block_rows=8) = 128 over 2 processes
    assert [dist.process_row_range(100, p, 2, 2, padded=128) for p in range(2)] == [(0, 64), (64, 100)]
    assert [dist.process_row_range(100, p, 4, 1, padded=160) for p in range(4)] == [
        (0, 40), (40, 80), (80, 100), (100, 100)]
    with pytest.raises(ValueError, match="multiple"):
        dist.process_row_range(100, 0, 2, 8, padded=120)
    with pytest.raises(ValueError, match=">= n"):
        dist.process_row_range(100, 0, 2, 1, padded=98)
    with pytest.raises(ValueError, match="process_index"):
        dist.process_row_range(10, 2, 2)


def test_load_rows_reads_only_the_slice_and_names_the_file(tmp_path):
    x = np.arange(40, dtype=np.float64).reshape(10, 4)
    path = tmp_path / "c.npy"
    np.save(path, x)
    rows = dist.load_rows(path, 3, 7, np.float32, dim=4)
    assert rows.dtype == np.float32 and rows.flags.owndata and rows.flags.writeable
    np.testing.assert_array_equal(rows, x[3:7])
    assert dist.load_rows(path, 10, 10).shape == (0, 4)
    with pytest.raises(SotjaxInputError, match=r"c.npy: rows have 4 values, expected 5$"):
        dist.load_rows(path, 0, 1, dim=5)
    with pytest.raises(SotjaxInputError, match=r"c.npy: rows \[8, 11\) out of range for 10 rows$"):
        dist.load_rows(path, 8, 11)
    bad = x.copy()
    bad[6, 2] = np.nan
    bad[8, 0] = 1e300
    np.save(path, bad)
    dist.load_rows(path, 0, 6)  # the NaN is not in these rows
    with pytest.raises(SotjaxInputError, match=r"c.npy: non-finite value \(NaN or inf\) in row 6$"):
        dist.load_rows(path, 4, 8)
    with pytest.raises(SotjaxInputError, match=r"c.npy: value too large for float32 in row 8$"):
        dist.load_rows(path, 7, 10, np.float32)
    np.save(tmp_path / "v.npy", np.zeros(3))
    with pytest.raises(SotjaxInputError, match=r"v.npy: expected a 2-D array"):
        dist.load_rows(tmp_path / "v.npy", 0, 1)
    np.save(tmp_path / "i.npy", np.zeros((3, 2), np.int64))
    with pytest.raises(SotjaxInputError, match=r"i.npy: expected a float array, got dtype int64"):
        dist.load_rows(tmp_path / "i.npy", 0, 1)
    (tmp_path / "c.jsonl").write_text("{}\n")
    with pytest.raises(SotjaxInputError, match=r"c.jsonl: a multi-process run reads .npy inputs only"):
        dist.load_rows(tmp_path / "c.jsonl", 0, 1)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(SotjaxInputError, match=r"junk.npy: not a readable .npy array"):
        dist.load_rows(tmp_path / "junk.npy", 0, 1)
    with pytest.raises(SotjaxInputError, match=r"missing.npy: no such file"):
        dist.load_rows(tmp_path / "missing.npy", 0, 1)


def test_single_process_global_rows_and_allgather():
    import jax

    from sotjax.streaming import AXIS

    assert dist.AXIS == AXIS
    mesh = dist.corpus_mesh()
    assert mesh.axis_names == (AXIS,) and mesh.devices.size == len(jax.devices())
    devices = mesh.devices.size
    local = np.arange(3 * 2, dtype=np.float32).reshape(3, 2)
    padded = dist.rows_per_process(3, 1, devices) * 1
    g = dist.global_rows(local, mesh, padded)
    assert g.shape == (padded, 2)
    full = dist.allgather_rows(g)
    np.testing.assert_array_equal(full[:3], local)
    np.testing.assert_array_equal(full[3:], 0)
    assert dist.is_writer()
    dist.raise_together(None)
    with pytest.raises(SotjaxInputError, match="mine"):
        dist.raise_together(SotjaxInputError("mine"))
    dist.barrier("single")


# ------------------------------------------------------------------------------------ two real processes

WORKER = textwrap.dedent('''
    import json, sys, time
    t0 = time.perf_counter()
    import jax
    import numpy as np

    from sotjax import distributed as dist
    from sotjax.errors import SotjaxInputError

    port, pid, data, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.config.update("jax_num_cpu_devices", 2)
    cfg = dist.DistributedConfig(f"127.0.0.1:{port}", 2, pid)
    t1 = time.perf_counter()
    dist.initialize(cfg, timeout_s=60, heartbeat_timeout_s=10, shutdown_timeout_s=30)
    dist.initialize(cfg)  # idempotent
    init_s = time.perf_counter() - t1

    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    mesh = dist.corpus_mesh()
    n = int(np.load(data, mmap_mode="r").shape[0])
    multiple = jax.local_device_count()
    per = dist.rows_per_process(n, jax.process_count(), multiple)
    n_pad = per * jax.process_count()
    start, stop = dist.process_row_range(n, jax.process_index(), jax.process_count(), multiple)
    local = dist.load_rows(data, start, stop, np.float32)
    x = dist.global_rows(local, mesh, n_pad)
    valid = dist.global_rows(np.ones(stop - start, bool), mesh, n_pad)  # padding rows: False

    def column_lse(xs, ok):  # log sum_i exp(x_ij) over the real rows, across devices and processes
        xs = jnp.where(ok[:, None], xs, -jnp.inf)
        top = jax.lax.pmax(jnp.max(xs, axis=0), dist.AXIS)
        total = jax.lax.psum(jnp.sum(jnp.exp(xs - top), axis=0), dist.AXIS)
        return top + jnp.log(total)

    lse = jax.jit(jax.shard_map(column_lse, mesh=mesh, in_specs=(P(dist.AXIS), P(dist.AXIS)), out_specs=P()))(x, valid)

    @jax.jit
    def normalised(xs, ok, col):
        row_softmax = jax.nn.softmax(xs, axis=1)         # row-local
        logits = jnp.where(ok, xs[:, 0], -jnp.inf)       # padding: no mass
        weights = jax.nn.softmax(logits)                 # over all rows: a cross-process reduction
        return row_softmax, weights, jnp.exp(xs - col)   # columns sum to 1 over the real rows

    rows, weights, cols = normalised(x, valid, lse)
    result = {k: dist.allgather_rows(v) for k, v in
              {"lse": lse, "rows": rows, "weights": weights, "cols": cols}.items()}
    try:
        dist.raise_together(SotjaxInputError("process 1's own error") if pid == 1 else None)
        agreed = "no error"
    except Exception as err:
        agreed = f"{type(err).__name__}: {err}"
    if dist.is_writer():
        np.savez(f"{out}/result.npz", **result)
    dist.barrier("written")
    with open(f"{out}/process{pid}.json", "w") as fh:
        json.dump({"range": [start, stop], "n_pad": n_pad, "local_rows": int(local.shape[0]),
                   "devices": len(jax.devices()), "local_devices": jax.local_device_count(),
                   "writer": dist.is_writer(), "agreed": agreed, "init_s": init_s,
                   "total_s": time.perf_counter() - t0,
                   "result_seen": __import__("os").path.exists(f"{out}/result.npz")}, fh)
''')


def test_two_processes_on_localhost_match_numpy(tmp_path):
    n, d = 13, 5
    x = np.random.default_rng(0).normal(size=(n, d)) * 3
    data = tmp_path / "corpus.npy"
    np.save(data, x.astype(np.float32))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    env = jax_child_env()
    port = free_port()
    runs = run_together([[sys.executable, str(script), str(port), str(i), str(data), str(out)] for i in range(2)],
                        [env] * 2, timeout=120)
    for i, r in enumerate(runs):
        assert r.returncode == 0, f"process {i} exited {r.returncode}:\n{(r.stdout + r.stderr)[-3000:]}"

    info = [json.loads((out / f"process{i}.json").read_text()) for i in range(2)]
    assert [i["range"] for i in info] == [[0, 8], [8, 13]]  # each loaded only its own rows
    assert [i["local_rows"] for i in info] == [8, 5]
    assert all(i["n_pad"] == 16 and i["devices"] == 4 and i["local_devices"] == 2 for i in info)
    assert [i["writer"] for i in info] == [True, False]
    assert all(i["result_seen"] for i in info)  # the barrier: written before anyone went on
    assert info[0]["agreed"] == "SotjaxInputError: process 1 of 2 stopped with an error (see its output)"
    assert info[1]["agreed"] == "SotjaxInputError: process 1's own error"
    assert sorted(p.name for p in out.iterdir()) == ["process0.json", "process1.json", "result.npz"]

    ref = x.astype(np.float32).astype(np.float64)
    top = ref.max(axis=0)
    lse = top + np.log(np.exp(ref - top).sum(axis=0))
    rows = np.exp(ref - ref.max(axis=1, keepdims=True))
    rows /= rows.sum(axis=1, keepdims=True)
    w = np.exp(ref[:, 0] - ref[:, 0].max())
    w /= w.sum()
    got = np.load(out / "result.npz")
    np.testing.assert_allclose(got["lse"], lse, rtol=1e-5)
    np.testing.assert_allclose(got["rows"][:n], rows, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["weights"][:n], w, rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(got["weights"][n:], 0)  # padding rows carry no mass
    np.testing.assert_allclose(got["cols"][:n], np.exp(ref - lse), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(got["cols"][:n].sum(axis=0), 1, rtol=1e-5)
