"""Sinkhorn throughput per plan at corpus scale, side by side with ott-jax, POT and the machine's floors.

For each (n, m, d) it measures the time of one Sinkhorn iteration (the difference between solves of
``k2`` and ``k1`` forced iterations, divided by ``k2 - k1``: compile and setup cancel) and reports
corpus-reference pair evaluations per second:

* ``sotjax dense``   : the kernel-mode dense geometry of ``sotjax.geometry`` (K stored, two mat-vecs);
* ``sotjax stream``  : ``sotjax.streaming`` (cost recomputed per block by a GEMM, one pass);
* ``ott dense``      : ott-jax's ``Sinkhorn`` on a dense ``PointCloud`` cosine geometry (log mode);
* ``POT``            : ``ot.sinkhorn(method="sinkhorn_log")`` in NumPy (only where n*m <= 1e8).

and the floors measured in the same run: GEMM FLOP/s (float32, ``Precision.HIGHEST``; square 4096 and,
per case, at the streamed block's own shape), ``exp`` per second, and memory bandwidth (a large array
copy). A streamed iteration costs ``2 n m d`` flops, so its share of the GEMM floor is
``2 d * pairs/s / (block-shaped GEMM FLOP/s)``. Every solve is forced to run its iterations (a
threshold below 0: random high-dimensional data converges to an exactly 0 error within a few).
Plans that do not fit the memory budget (``sotjax.plan``) are skipped and said so.

Usage: python benchmarks/bench_scale.py [--n 10000,100000] [--m 50,5000] [--d 64,384,768]
                                        [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import cpu_name

from sotjax import streaming
from sotjax.geometry import cosine_geometry
from sotjax.plan import default_budget_bytes, estimate_bytes
from sotjax.transport import Potentials, SinkhornSettings, solve_sinkhorn

#: a stopping threshold no error can reach (errors are >= 0): every solve runs exactly k iterations. On
#: random high-dimensional data the marginal error reaches exactly 0 within a few iterations, so a
#: threshold of 0 would stop early and the per-iteration differences would measure nothing.
NEVER = -1.0


def unit_rows(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def best_of(fn, repeats=3):
    fn()  # warm (compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def per_iteration(run, k1, k2):
    """Seconds per iteration from solves forced to ``k1`` and ``k2`` iterations."""
    t1 = best_of(lambda: run(k1), repeats=2)
    t2 = best_of(lambda: run(k2), repeats=2)
    return max(t2 - t1, 1e-9) / (k2 - k1)


def floors(size=4096):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(size, size)).astype(np.float32))
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
    t = best_of(lambda: mm(a, a).block_until_ready())
    gemm = 2 * size**3 / t
    big = jnp.asarray(rng.normal(size=(64 << 20) // 4).astype(np.float32))  # 64 MiB
    ex = jax.jit(jnp.exp)
    t = best_of(lambda: ex(big).block_until_ready())
    exps = big.size / t
    cp = jax.jit(lambda x: x + 1.0)
    t = best_of(lambda: cp(big).block_until_ready())
    bandwidth = 2 * big.nbytes / t  # read + write
    return {"gemm_flops": gemm, "exp_per_s": exps, "bandwidth_bytes_per_s": bandwidth}


def bench_case(n, m, d, eps, budget, k1=3, k2=8, pot_max_pairs=1e8):
    rng = np.random.default_rng(1)
    x, y = jnp.asarray(unit_rows(rng, n, d)), jnp.asarray(unit_rows(rng, m, d))
    a, b = jnp.full((n,), 1.0 / n, jnp.float32), jnp.full((m,), 1.0 / m, jnp.float32)
    rows = {}

    dense_bytes = estimate_bytes("dense", n, (m,), d)
    if dense_bytes <= budget:
        geom, _ = cosine_geometry(x, y, eps, lse_mode="kernel")
        init = Potentials(jnp.zeros((n,)), jnp.zeros((m,)))

        @functools.partial(jax.jit, static_argnums=3)  # compiled once per k, outside the timed calls
        def dense_solve(g, a, b, k):
            return solve_sinkhorn(g, a, b, init, SinkhornSettings(threshold=NEVER, max_iterations=k))[0].f

        def run_dense(k):
            jax.block_until_ready(dense_solve(geom, a, b, k))

        rows["sotjax dense"] = per_iteration(run_dense, k1, k2)

        from ott.geometry import pointcloud
        from ott.problems.linear import linear_problem
        from ott.solvers.linear import sinkhorn as ott_sinkhorn

        pc = pointcloud.PointCloud(x, y, cost_fn=None, epsilon=eps)

        @functools.partial(jax.jit, static_argnums=3)
        def ott_solve(g, a, b, k):
            solver = ott_sinkhorn.Sinkhorn(threshold=NEVER, min_iterations=k, max_iterations=k, inner_iterations=1)
            return solver(linear_problem.LinearProblem(g, a, b)).f

        def run_ott(k):
            jax.block_until_ready(ott_solve(pc, a, b, k))

        rows["ott dense (PointCloud)"] = per_iteration(run_ott, k1, k2)
    else:
        rows["sotjax dense"] = None

    block = 1024 if n >= 1024 else n
    sgeom = streaming.streamed_cosine(x, y, block, eps)
    solve = jax.jit(streaming.sinkhorn, static_argnames=("max_iterations",))

    def run_stream(k):
        out = solve(sgeom, a, b, jnp.float32(eps), jnp.zeros((m,)), jnp.float32(NEVER), max_iterations=k)
        jax.block_until_ready(out.f)

    rows["sotjax stream"] = per_iteration(run_stream, k1, k2)
    # the GEMM floor at the streamed block's own shape (B x d times d x m), measured in this run
    xb = x[:block]
    mm = jax.jit(lambda p, q: jnp.matmul(p, q.T, precision=jax.lax.Precision.HIGHEST))
    gemm_block = 2 * block * d * m / best_of(lambda: mm(xb, y).block_until_ready())

    if n * m <= pot_max_pairs:
        try:
            import ot

            cost = np.clip(1.0 - np.asarray(x) @ np.asarray(y).T, 0, 2).astype(np.float64)
            an, bn = np.full(n, 1.0 / n), np.full(m, 1.0 / m)

            def run_pot(k):
                ot.sinkhorn(an, bn, cost, eps, method="sinkhorn_log", numItermax=k, stopThr=NEVER)

            rows["POT (numpy, log)"] = per_iteration(run_pot, 2, 4)
        except ImportError:
            pass
    out = {name: (None if t is None else {"s_per_iter": t, "pairs_per_s": n * m / t}) for name, t in rows.items()}
    out["sotjax stream"]["gemm_floor_flops"] = gemm_block
    return out


def machine():
    cpu = cpu_name()
    return {"cpu": cpu, "cores": os.cpu_count(), "device": str(jax.devices()[0]), "jax": jax.__version__,
            "matmul_precision": str(jax.config.jax_default_matmul_precision), "load": os.getloadavg()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="10000,100000")
    p.add_argument("--m", default="50,5000")
    p.add_argument("--d", default="64,384,768")
    p.add_argument("--epsilon", type=float, default=0.1)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args()
    budget = default_budget_bytes()
    info = {"machine": machine(), "floors": floors(), "budget_bytes": budget, "cases": []}
    fl = info["floors"]
    lines = ["| n | m | d | plan | ms / iteration | Mpairs/s | share of GEMM floor |", "|---|---|---|---|---|---|---|"]
    for n in map(int, args.n.split(",")):
        for m in map(int, args.m.split(",")):
            for d in map(int, args.d.split(",")):
                res = bench_case(n, m, d, args.epsilon, budget)
                info["cases"].append({"n": n, "m": m, "d": d, "results": res})
                for name, r in res.items():
                    if r is None:
                        lines.append(f"| {n} | {m} | {d} | {name} | does not fit | | |")
                        continue
                    share = 2 * d * r["pairs_per_s"] / r["gemm_floor_flops"] if "stream" in name else None
                    lines.append(f"| {n} | {m} | {d} | {name} | {1e3 * r['s_per_iter']:.2f} | "
                                 f"{r['pairs_per_s'] / 1e6:.1f} | {'' if share is None else f'{share:.0%}'} |")
                print(lines[-1], flush=True)
    head = (f"Machine: {info['machine']}\n\nFloors: GEMM {fl['gemm_flops'] / 1e9:.0f} GFLOP/s, "
            f"exp {fl['exp_per_s'] / 1e9:.2f} G/s, bandwidth {fl['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s\n\n")
    text = head + "\n".join(lines) + "\n"
    print(text)
    if args.json:
        args.json.write_text(json.dumps(info, indent=2, default=str) + "\n")
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
