"""Full Stage-1 fits at corpus scale: wall time, peak RSS and the plan the planner chose.

Workload (the issue's): N_s = 50 safe anchors, N_h = 5000 harmful references, d = 384, a corpus of
n rows with 10% from the harmful cluster (``sotjax.synthetic``'s geometry, generated in chunks so the
generator never holds more than one chunk in float64), the default config (lambda 0.5, epsilon 0.1,
transport loss, SGD, the stopping rule), ``--plan auto`` under ``--memory-budget``.

Every n runs in its own subprocess (peak RSS is the child's ``VmHWM``, which includes the
generated input: 4 n d bytes, 1.5 GB at n = 10^6). Reported: wall time of ``sotjax.fit`` (setup,
first step incl. compilation, the rest), steps, Sinkhorn and CG iterations of all steps, whether it
converged, the plan and its block, peak RSS, and the AUROC of the logits for the planted labels.

Usage: python benchmarks/bench_fit.py --n 100000,300000,1000000 [--budget 14GiB] [--plan auto]
       [--out benchmarks/RESULTS_fit.json] [--markdown benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name  # noqa: E402

CHILD = r'''
import json, sys, time
import numpy as np
n, d, n_safe, n_harm, budget, plan, steps = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                              int(sys.argv[4]), sys.argv[5], sys.argv[6], int(sys.argv[7]))
import sotjax
from sotjax.plan import parse_bytes

rng = np.random.default_rng(0)
def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)
common = unit(rng.normal(size=d))
task, harm = unit(rng.normal(size=d) + common), unit(rng.normal(size=d) + common)
def around(centre, k, out=None, chunk=65536):
    out = np.empty((k, d), np.float32) if out is None else out
    for s in range(0, k, chunk):
        e = min(k, s + chunk)
        out[s:e] = unit(centre + rng.normal(size=(e - s, d)) / 4)
    return out
n_bad = n // 10
x = np.empty((n, d), np.float32)
around(task, n - n_bad, x[: n - n_bad]); around(harm, n_bad, x[n - n_bad:])
safe, harmful = around(task, n_safe), around(harm, n_harm)
cfg = sotjax.SOTConfig(plan=plan, memory_budget=parse_bytes(budget), steps=steps)
t0 = time.perf_counter()
res = sotjax.fit(x, safe, harmful, cfg)
wall = time.perf_counter() - t0
labels = np.zeros(n, bool); labels[n - n_bad:] = True
from sotjax.eval.metrics import auroc
detect = float(auroc(res.logits, labels))             # logits are keep-scores (benign high)
print(json.dumps({
    "n": n, "wall_s": wall, "timings": res.timings, "steps": res.n_steps, "converged": bool(res.converged),
    "message": res.message, "plan": res.plan.to_dict(),
    "sinkhorn_iterations": int(res.sinkhorn_iterations.sum()), "cg_iterations": int(res.adjoint_iterations.sum()),
    "peak_rss_bytes": next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")),
    "auroc": detect}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="100000,300000,1000000")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--safe", type=int, default=50)
    ap.add_argument("--harmful", type=int, default=5000)
    ap.add_argument("--budget", default="14GiB")
    ap.add_argument("--plan", default="auto")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--timeout", type=int, default=7200)
    ap.add_argument("--out", default="benchmarks/RESULTS_fit.json")
    ap.add_argument("--markdown", default=None, help="append a section to this Markdown file")
    args = ap.parse_args()
    rows = []
    for n in (int(v) for v in args.n.split(",")):
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(n), str(args.d), str(args.safe), str(args.harmful),
                               args.budget, args.plan, str(args.steps)], capture_output=True, text=True,
                              timeout=args.timeout, env={**os.environ, "SOTJAX_COMPILATION_CACHE": "0"})
        if proc.returncode != 0:
            row = {"n": n, "error": proc.stderr.strip().splitlines()[-1:], "wall_s": time.time() - t0}
        else:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    load = os.getloadavg()
    report = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(),
              "load_after": load, "settings": vars(args), "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        lines = [f"\n## Full fits at scale ({report['date']}, `python benchmarks/bench_fit.py --n {args.n} "
                 f"--budget {args.budget}`)\n",
                 f"{report['cpu']}, {report['cores']} cores, load average after the run {load[0]:.1f}. N_s = "
                 f"{args.safe}, N_h = {args.harmful}, d = {args.d}, default config, plan {args.plan}.\n",
                 "| n | plan | block | fit (s) | setup / first step / rest (s) | steps | Sinkhorn it. | CG it. |"
                 " converged | peak RSS (GiB) | AUROC |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['n']:,} | failed: {r['error']} | | | | | | | | | |")
                continue
            t = r["timings"]
            lines.append(f"| {r['n']:,} | {r['plan']['kind']} | {r['plan']['block_rows'] or '—'} | {r['wall_s']:.1f} |"
                         f" {t['setup']:.1f} / {t['compile']:.1f} / {t['optimize']:.1f} | {r['steps']} |"
                         f" {r['sinkhorn_iterations']} | {r['cg_iterations']} | {r['converged']} |"
                         f" {r['peak_rss_bytes'] / 2**30:.2f} | {r['auroc']:.4f} |")
        with open(args.markdown, "a") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
