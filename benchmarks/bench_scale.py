"""Sinkhorn throughput per plan at corpus scale, side by side with ott-jax, POT and the machine's floors.

A thin wrapper over :mod:`sotjax.bench` (what ``sotjax bench`` runs), kept for its Markdown output:
every measurement, floor and skip rule lives there, so the two never diverge. For each (n, m, d) it
reports the seconds of one Sinkhorn iteration (solves forced to 2 and 2 + ``--iterations``
iterations, each compiled once and warmed up, the difference divided by ``--iterations``) and
corpus-reference pair evaluations per second of:

* ``sotjax dense``   : the kernel-mode dense geometry of ``sotjax.geometry`` (K stored, two mat-vecs);
* ``sotjax stream``  : ``sotjax.streaming`` (cost recomputed per block by a GEMM, one pass), with the
  block the memory planner would choose;
* ``ott dense``      : ott-jax's ``Sinkhorn`` on a dense ``PointCloud`` (log mode, the same problem);
* ``POT``            : ``ot.sinkhorn(method="sinkhorn_log")`` in NumPy (only where n*m <= 1e8).

and each row's share of the machine's floor measured in the same run (GEMM FLOP/s at the streamed
block's shape; memory bandwidth for the stored kernel; exp/s for the log-domain solvers). Plans that
do not fit the memory budget (``sotjax.plan``) are skipped and said so. Unlike ``sotjax bench`` it
leaves ``jax_default_matmul_precision`` as the environment sets it (``--precision`` to change).

Usage: python benchmarks/bench_scale.py [--n 10000,100000] [--m 50,5000] [--d 64,384,768]
                                        [--plans dense,stream,ott,pot] [--iterations 5]
                                        [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sotjax import bench
from sotjax.atomic import write_text_atomic
from sotjax.io import dumps_json


def markdown_row(row: dict) -> str:
    n, m, d, name = row["n"], row["m"], row["d"], row["label"]
    if row["status"] != "ok":
        return f"| {n} | {m} | {d} | {name} | skipped: {row['reason']} | | |"
    share = row["percent_of_floor"]
    floor = "" if share is None else f"{share:.0f}% ({row['floor']})"
    return (f"| {n} | {m} | {d} | {name} | {1e3 * row['seconds_per_iteration']:.2f} | "
            f"{row['pairs_per_second'] / 1e6:.1f} | {floor} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="10000,100000")
    p.add_argument("--m", default="50,5000")
    p.add_argument("--d", default="64,384,768")
    p.add_argument("--plans", default=",".join(bench.PLANS))
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--epsilon", type=float, default=0.1)
    p.add_argument("--precision", default=None, help="jax_default_matmul_precision (default: as set)")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args()
    if args.precision is not None:
        bench.set_matmul_precision(args.precision)

    def ints(text: str) -> list[int]:
        return [int(float(v)) for v in text.split(",")]

    budget, host_budget = bench.default_budgets()
    info = {"machine": bench.machine_info(), "floors": bench.measure_floors(), "budget_bytes": budget,
            "host_budget_bytes": host_budget}
    lines = ["| n | m | d | plan | ms / iteration | Mpairs/s | share of floor |", "|---|---|---|---|---|---|---|"]

    def on_row(row: dict) -> None:
        lines.append(markdown_row(row))
        print(lines[-1], flush=True)

    sizes = bench.grid(ints(args.n), ints(args.m), ints(args.d))
    rows = bench.run_bench(sizes, [s.strip() for s in args.plans.split(",")], iterations=args.iterations,
                           epsilon=args.epsilon, budget_bytes=budget, host_budget_bytes=host_budget,
                           floors=info["floors"], on_row=on_row)
    info["rows"] = rows
    # per size: {label: {s_per_iter, pairs_per_s, ...} or None when skipped}, as before the move
    info["cases"] = [
        {"n": s.n, "m": s.m, "d": s.d,
         "results": {r["label"]: None if r["status"] != "ok" else
                     {"s_per_iter": r["seconds_per_iteration"], "pairs_per_s": r["pairs_per_second"],
                      "floor": r["floor"], "percent_of_floor": r["percent_of_floor"]}
                     for r in rows if (r["n"], r["m"], r["d"]) == (s.n, s.m, s.d)}}
        for s in sizes
    ]
    text = (f"Machine: {bench.format_machine(info['machine'])}\n\n{bench.format_floors(info['floors'])}\n\n"
            + "\n".join(lines) + "\n")
    print(text)
    if args.json:
        write_text_atomic(args.json, dumps_json(info))
    if args.markdown:
        write_text_atomic(args.markdown, text)


if __name__ == "__main__":
    main()
