"""The ``dense-bf16`` plan (bfloat16 Gibbs kernel in row blocks) against ``dense`` (float32) and ``stream``.

Two measurements, in one process:

1. **Seconds per Sinkhorn iteration**, side by side, for each ``n`` (random unit rows, uniform
   marginals, cosine cost, epsilon 0.1, float32):

   * ``dense``      : :func:`sotjax.geometry.cosine_geometry` in kernel mode (``C``, ``K`` and ``K * C``
     stored in float32) solved by :func:`sotjax.transport.solve_sinkhorn` (ott-jax's scalings);
   * ``dense-bf16`` : :func:`sotjax.streaming.stored_kernel` (``K`` only, bfloat16, blocks of the rows
     the planner chooses) solved by :func:`sotjax.streaming.sinkhorn`;
   * ``stream``     : :func:`sotjax.streaming.streamed_cosine` (the cost recomputed per block by a GEMM),
     the block the planner chooses for the default budget, same solver.

   Every solve is forced (threshold < 0) to 3 and to 3 + ``--iterations`` iterations, each compiled
   once and warmed up, then timed best of ``--repeats``; one iteration is the difference divided by
   ``--iterations``. The stored bytes per plan are the planner's estimates (:mod:`sotjax.plan`),
   also at n = 10**6 x 5050 references; a plan whose estimate exceeds the budget (``--budget``; default
   60% of the available memory) is skipped.

2. **Effect on the weights**: the full default fit (``SOTConfig()``: lambda 0.5, epsilon 0.1, transport
   loss, stopping rule) of a synthetic problem (:func:`sotjax.synthetic.make_problem`, ``--fit-n`` rows,
   10% harmful) with ``plan="dense"`` and ``plan="dense-bf16"``: Spearman correlation of the logits (the
   weights' ranking; collapsed weights underflow, logits do not), the overlap of the Top-80% sets, the L1
   distance of the weights, steps and wall time.

Usage: python benchmarks/bench_bf16.py [--n 10000,50000] [--m 5000] [--d 384] [--plans dense,dense-bf16,stream]
                                       [--budget 16GiB] [--iterations 5] [--fit-n 20000] [--fit-m 5000] [--fit-d 384]
                                       [--markdown out.md]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sotjax import plan as planner
from sotjax import streaming

WARMUP = 3
EPSILON = 0.1
NEVER = -1.0  # a threshold no marginal error goes below: every solve runs its iterations


def unit(key: jax.Array, rows: int, d: int) -> jax.Array:
    x = jax.random.normal(key, (rows, d), jnp.float32)
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


def per_iteration(run, iterations: int, repeats: int) -> tuple[float, float]:
    """``(seconds per iteration, compile + warm-up seconds)`` of ``run(k)`` (k forced iterations)."""
    t0 = time.perf_counter()
    run(WARMUP)
    run(WARMUP + iterations)
    compile_s = time.perf_counter() - t0

    def best(k: int) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(k)
            times.append(time.perf_counter() - start)
        return min(times)

    return (best(WARMUP + iterations) - best(WARMUP)) / iterations, compile_s


def dense_run(x, y):
    from sotjax.geometry import cosine_geometry
    from sotjax.transport import Potentials, SinkhornSettings, solve_sinkhorn

    n, m = x.shape[0], y.shape[0]
    geom, _ = cosine_geometry(x, y, EPSILON, lse_mode="kernel")
    a, b = jnp.full((n,), 1.0 / n), jnp.full((m,), 1.0 / m)
    init = Potentials(jnp.zeros((n,)), jnp.zeros((m,)))

    @functools.partial(jax.jit, static_argnums=4)
    def solve(g, a, b, init, k):
        settings = SinkhornSettings(threshold=NEVER, max_iterations=k, newton_fallback=False)
        return solve_sinkhorn(g, a, b, init, settings)[0].f

    return lambda k: jax.block_until_ready(solve(geom, a, b, init, k)), geom


def blocked_run(geom):
    n, m = geom.shape
    a, b = jnp.full((n,), 1.0 / n), jnp.full((m,), 1.0 / m)
    solve = jax.jit(streaming.sinkhorn, static_argnames=("max_iterations",))
    eps, never, g0 = jnp.float32(EPSILON), jnp.float32(NEVER), jnp.zeros((m,), jnp.float32)
    return lambda k: jax.block_until_ready(solve(geom, a, b, eps, g0, never, max_iterations=k).f)


def throughput(ns: list[int], m: int, d: int, iterations: int, repeats: int, plans: list[str],
               budget: int | None = None) -> list[dict]:
    rows = []
    y = unit(jax.random.PRNGKey(1), m, d)
    budget = planner.default_budget_bytes() if budget is None else budget
    for n in ns:
        x = unit(jax.random.PRNGKey(0), n, d)
        bf16_block = planner.bf16_block_rows(n, (m,))
        stream_block = planner.plan_memory(n, (m,), d, kind="stream").block_rows or 1
        for name in plans:
            block = {"dense": None, "dense-bf16": bf16_block, "stream": stream_block}[name]
            est = planner.estimate_bytes(name, n, (m,), d, block_rows=block)
            if est > budget:
                print(f"n={n} {name}: skipped, needs about {est / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB")
                continue
            if name == "dense":
                run, geom = dense_run(x, y)
                block = None
            elif name == "dense-bf16":
                geom, _ = streaming.stored_kernel(x, y, bf16_block, EPSILON)
                run, block = blocked_run(geom), bf16_block
            else:
                geom = streaming.streamed_cosine(x, y, stream_block, EPSILON)
                run, block = blocked_run(geom), stream_block
            seconds, compile_s = per_iteration(run, iterations, repeats)
            rows.append({"n": n, "m": m, "d": d, "plan": name, "block": block, "ms": 1e3 * seconds,
                         "compile_s": compile_s, "est_gib": est / 2**30})
            print(f"n={n} m={m} d={d} {name:10s} block={block} {1e3 * seconds:9.2f} ms/iteration "
                  f"(compile+warm-up {compile_s:.1f} s, planner estimate {est / 2**30:.2f} GiB)", flush=True)
            del geom, run
    return rows


def weights_effect(n: int, m: int, d: int, seed: int) -> dict:
    from scipy.stats import spearmanr

    import sotjax
    from sotjax.synthetic import make_problem

    p = make_problem(n=n, n_safe=50, n_harmful=m, dim=d, seed=seed)
    fits = {}
    for kind in ("dense", "dense-bf16"):
        start = time.perf_counter()
        res = sotjax.fit(p.corpus, p.safe, p.harmful, sotjax.SOTConfig(plan=kind))
        fits[kind] = (res, time.perf_counter() - start)
        print(f"fit n={n} {kind}: {res.n_steps} steps, {fits[kind][1]:.1f} s, {res.message}", flush=True)
    (dense, t_dense), (bf16, t_bf16) = fits["dense"], fits["dense-bf16"]
    keep = int(0.8 * n)
    top = len(set(np.argsort(-dense.logits)[:keep]) & set(np.argsort(-bf16.logits)[:keep])) / keep
    harmful_kept = {k: float(np.mean(p.is_harmful[np.argsort(-r.logits)[:keep]])) for k, (r, _) in fits.items()}
    out = {"n": n, "m": m, "d": d, "seed": seed,
           "spearman": float(spearmanr(dense.logits, bf16.logits).statistic), "top80_overlap": top,
           "weights_l1": float(np.abs(dense.weights - bf16.weights).sum()),
           "steps": (dense.n_steps, bf16.n_steps), "seconds": (t_dense, t_bf16),
           "objective": (float(dense.objective[-1]), float(bf16.objective[-1])),
           "harmful_share_of_top80": (harmful_kept["dense"], harmful_kept["dense-bf16"]),
           "block": bf16.plan.block_rows if bf16.plan else None}
    print(out, flush=True)
    return out


def markdown(rows: list[dict], fit: dict | None, args) -> str:
    load = os.getloadavg()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    lines = [
        f"Command: `python benchmarks/bench_bf16.py {args.argv}`. Machine: {platform.machine()} "
        f"{os.cpu_count()}-core CPU, jax {jax.__version__} ({jax.default_backend()}); load average "
        f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} at the end of the run; peak RSS of the run {peak:.2f} GiB.",
        "",
        "| n | m | d | plan | block rows | ms / iteration | vs dense | vs stream | planner estimate (GiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = {x["plan"]: x["ms"] for x in rows if x["n"] == r["n"]}
        ratio = {k: f"{same[k] / r['ms']:.2f}x" if k in same else "" for k in ("dense", "stream")}
        lines.append(f"| {r['n']} | {r['m']} | {r['d']} | {r['plan']} | {r['block'] or ''} | {r['ms']:.2f} | "
                     f"{ratio['dense']} | {ratio['stream']} | {r['est_gib']:.2f} |")
    big = {k: planner.estimate_bytes(k, 10**6, (50, 5000), 384) / 2**30 for k in ("dense", "dense-bf16", "stream")}
    lines += ["", "Planner estimates at n = 10⁶, references 50 + 5000, d = 384: "
              + ", ".join(f"{k} {v:.1f} GiB" for k, v in big.items()) + "."]
    if fit is not None:
        lines += ["", f"Weights, full default fit (`SOTConfig()`), `make_problem(n={fit['n']}, n_safe=50, "
                  f"n_harmful={fit['m']}, dim={fit['d']}, seed={fit['seed']})`, dense vs dense-bf16 "
                  f"(block {fit['block']}): Spearman of the logits {fit['spearman']:.6f}, Top-80% overlap "
                  f"{fit['top80_overlap']:.6f}, L1 distance of the weights {fit['weights_l1']:.2e}, steps "
                  f"{fit['steps'][0]} / {fit['steps'][1]}, final objective {fit['objective'][0]:.6f} / "
                  f"{fit['objective'][1]:.6f}, harmful share of the Top-80% {fit['harmful_share_of_top80'][0]:.4f} / "
                  f"{fit['harmful_share_of_top80'][1]:.4f}, wall time {fit['seconds'][0]:.1f} s / "
                  f"{fit['seconds'][1]:.1f} s (with compilation)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="10000,50000")
    p.add_argument("--m", type=int, default=5000)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--plans", default="dense,dense-bf16,stream")
    p.add_argument("--budget", default=None, help="memory budget, e.g. 16GiB (default: 60%% of the available)")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--fit-n", type=int, default=20000, help="0: skip the fit")
    p.add_argument("--fit-m", type=int, default=5000)
    p.add_argument("--fit-d", type=int, default=384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args()
    import sys

    args.argv = " ".join(sys.argv[1:])
    plans = [v for v in args.plans.split(",") if v]
    budget = None if args.budget is None else planner.parse_bytes(args.budget, "--budget")
    rows = throughput([int(float(v)) for v in args.n.split(",") if v], args.m, args.d, args.iterations, args.repeats,
                      plans, budget)
    fit = weights_effect(args.fit_n, args.fit_m, args.fit_d, args.seed) if args.fit_n else None
    text = markdown(rows, fit, args)
    print(text)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
