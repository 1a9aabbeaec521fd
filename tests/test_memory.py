"""A streamed fit's peak memory does not grow with n beyond O(n d): the peak RSS of a subprocess
fitting 4x more corpus rows grows by little more than the inputs, while the dense plan's grows by the
n x m matrices it stores (measured side by side, same problem sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent('''
    import json, sys
    import numpy as np
    import sotjax
    n, plan = int(sys.argv[1]), sys.argv[2]
    m, d = 800, 32
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    s, h = rng.normal(size=(20, d)).astype(np.float32), rng.normal(size=(m, d)).astype(np.float32)
    budget = None if plan == "dense" else 600 << 20   # stream: small blocks whatever n
    res = sotjax.fit(x, s, h, sotjax.SOTConfig(plan=plan, steps=2, memory_budget=budget))
    # VmHWM: this process image's peak RSS (ru_maxrss would keep the forking parent's size across exec)
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"peak": peak, "plan": res.plan.kind, "block": res.plan.block_rows,
                      "input": x.nbytes, "finite": bool(np.isfinite(res.weights).all())}))
''')


def _peak(n: int, plan: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "SOTJAX_COMPILATION_CACHE": "0"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(n), plan], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_streamed_peak_memory_stays_bounded_while_n_grows_4x():
    small, large = _peak(15_000, "stream"), _peak(60_000, "stream")
    dense_small, dense_large = _peak(15_000, "dense"), _peak(60_000, "dense")
    assert small["plan"] == large["plan"] == "stream" and small["block"] == large["block"]
    assert dense_small["plan"] == dense_large["plan"] == "dense"
    assert small["finite"] and large["finite"]
    grown = large["peak"] - small["peak"]
    dense_grown = dense_large["peak"] - dense_small["peak"]
    # 45k more rows of d = 32: 5.8 MB of float32 input; the host keeps a few O(n d) copies (the input,
    # its unit rows, the padded device array) and O(n) vectors: allow 16 bytes per input byte
    extra_input = large["input"] - small["input"]
    assert grown <= 16 * extra_input + (32 << 20), (grown, dense_grown)
    # the dense plan stores three n x (m + 20) float32 matrices: 45k rows add ~440 MB
    assert dense_grown >= 3 * 4 * 45_000 * 820 * 0.7, dense_grown
    assert grown < dense_grown / 4
