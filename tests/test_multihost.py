"""Two real processes on localhost (``jax.distributed``, 2 CPU devices each) run one fit over a
4-device mesh: each process reads only its own rows of the memory-mapped corpus, and the weights are
the single-process weights (dense and streamed plans, float64)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    return env


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
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), str(folder), plan],
                              env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{logs[i][-3000:] if logs else ''}"
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
