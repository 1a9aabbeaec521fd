"""Stage 1 at the paper's scale: sotjax vs a faithful PyTorch reimplementation of the paper's algorithm.

Workload (paper defaults): corpus n = 5000 with 10% from a separate (harmful) cluster, N_s = 50 safe
anchors, N_h = 5000 harmful references, d in {576, 384}; lambda = 0.5, epsilon = 0.1, transport loss.

Reference ("paper algorithm"): PyTorch, float32, log-domain Sinkhorn with a fixed 200 iterations,
unrolled and differentiated by autograd (checkpointed in blocks of 20 iterations so that it fits in
memory; the numbers are identical to plain unrolling), SGD with momentum 0.9 on softmax logits. Its
learning rate is sotjax's ``lr * n`` on the raw objective, which is the same update as sotjax's
size-independent ``lr`` (sotjax multiplies the logit gradient by n).

Measured side by side in one process:
  * sotjax: full Stage 1 (the default config, run to its stopping rule), first call (with compilation)
    and a second call (compiled), plus the compile time of the first step.
  * reference: wall time of ``--ref-steps`` outer steps (one unrolled 200-iteration solve per side and
    its backward each). A full reference run of as many steps as sotjax took would take about 3 minutes
    per step on this 2-core CPU, so its full time is extrapolated from the measured steps (labelled).
  * agreement: Spearman correlation of the two weight vectors after the same number of steps
    (``--ref-steps``) at paper scale, and after a full run on a smaller problem (``--small-n``) where the
    reference can run to the same number of steps as sotjax.

Usage: python benchmarks/bench_stage1.py [--dims 576,384] [--ref-steps 2] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

import sotjax
from sotjax.synthetic import make_problem


def torch_reference(corpus, safe, harmful, *, steps, lam=0.5, eps=0.1, lr=1.0, momentum=0.9,
                    iterations=200, block=20):
    import torch
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    def unit(x):
        return torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float32), dim=1)

    x = unit(corpus)
    costs = [(1.0 - x @ unit(ref).T).clamp(0.0, 2.0) for ref in (safe, harmful)]
    n = x.shape[0]

    def sinkhorn_block(f, g, log_a, log_b, cost):
        for _ in range(block):
            f = -eps * torch.logsumexp((g[None, :] - cost) / eps + log_b[None, :], dim=1)
            g = -eps * torch.logsumexp((f[:, None] - cost) / eps + log_a[:, None], dim=0)
        return f, g

    def transport_cost(w, cost):
        m = cost.shape[1]
        log_a, log_b = torch.log(w), torch.full((m,), -float(np.log(m)))
        f, g = torch.zeros(n), torch.zeros(m)
        for _ in range(iterations // block):
            f, g = checkpoint(sinkhorn_block, f, g, log_a, log_b, cost, use_reentrant=False)
        plan = torch.exp((f[:, None] + g[None, :] - cost) / eps + log_a[:, None] + log_b[None, :])
        return (plan * cost).sum()

    theta = torch.zeros(n, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=lr * n, momentum=momentum)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        w = torch.softmax(theta, dim=0)
        loss = (1 - lam) * transport_cost(w, costs[0]) - lam * transport_cost(w, costs[1])
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return theta.detach().numpy().astype(np.float64), times


def sotjax_run(p, config):
    first = sotjax.fit(p.corpus, p.safe, p.harmful, config)
    second = sotjax.fit(p.corpus, p.safe, p.harmful, config)
    return first, second


def auroc(scores, positive):
    from scipy.stats import rankdata

    r = rankdata(scores)
    n_pos = positive.sum()
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (~positive).sum()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--n-safe", type=int, default=50)
    ap.add_argument("--n-harmful", type=int, default=5000)
    ap.add_argument("--dims", default="576,384")
    ap.add_argument("--ref-steps", type=int, default=2)
    ap.add_argument("--small-n", type=int, default=600)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = ap.parse_args()

    import jax
    import torch

    rows = []
    for dim in [int(d) for d in args.dims.split(",")]:
        p = make_problem(n=args.n, n_safe=args.n_safe, n_harmful=args.n_harmful, dim=dim, seed=0)
        first, second = sotjax_run(p, sotjax.SOTConfig())
        k = args.ref_steps
        ref_theta, ref_times = torch_reference(p.corpus, p.safe, p.harmful, steps=k)
        ours_k = sotjax.fit(p.corpus, p.safe, p.harmful, sotjax.SOTConfig(steps=k, objective_tol=0, weight_tol=0))
        per_step = float(np.mean(ref_times))
        ref_full = per_step * second.n_steps
        ours = second.timings["total"]
        rows.append(dict(
            dim=dim, steps=second.n_steps, first_total=first.timings["total"], compile=first.timings["compile"],
            ours=ours, setup=second.timings["setup"], ref_step=per_step, ref_full=ref_full, ratio=ref_full / ours,
            rho_k=spearmanr(ours_k.logits, ref_theta)[0], auroc=auroc(second.logits, ~p.is_harmful),
            sk=int(second.sinkhorn_iterations.sum()), adj=int(second.adjoint_iterations.sum()),
        ))
        print(rows[-1], flush=True)

    # full-run agreement on a problem small enough for the reference to run to the same step count
    ps = make_problem(n=args.small_n, n_safe=args.n_safe, n_harmful=args.small_n, dim=576, seed=1)
    ours_s = sotjax.fit(ps.corpus, ps.safe, ps.harmful, sotjax.SOTConfig())
    ref_s, ref_s_times = torch_reference(ps.corpus, ps.safe, ps.harmful, steps=ours_s.n_steps)
    small = dict(n=args.small_n, steps=ours_s.n_steps, rho=spearmanr(ours_s.logits, ref_s)[0],
                 ours=ours_s.timings["total"], ref=float(np.sum(ref_s_times)),
                 auroc_ours=auroc(ours_s.logits, ~ps.is_harmful), auroc_ref=auroc(ref_s, ~ps.is_harmful))
    print(small, flush=True)

    cpu = platform.processor() or platform.machine()
    lines = [
        "## Stage 1 at paper scale (`benchmarks/bench_stage1.py`)",
        "",
        f"Machine: {os.cpu_count()}-core {cpu} CPU ({platform.platform()}), jax {jax.__version__} "
        f"({jax.devices()[0].platform}), torch {torch.__version__} ({torch.get_num_threads()} threads). "
        f"Command: `python benchmarks/bench_stage1.py --dims {args.dims} --ref-steps {args.ref_steps}"
        f" --small-n {args.small_n}`. Date: {time.strftime('%Y-%m-%d')}.",
        "",
        f"n = {args.n} (10% harmful cluster), N_s = {args.n_safe}, N_h = {args.n_harmful}; lambda 0.5, eps 0.1, "
        "transport loss, default config (SGD momentum 0.9, lr 1, stopping rule). Reference = the paper's "
        "algorithm in PyTorch (200 unrolled log-domain Sinkhorn iterations per solve, autograd, SGD momentum).",
        "",
        "| d | sotjax steps | sotjax 1st run (s) | of which 1st step+compile (s) | sotjax compiled run (s) "
        "| reference s/step (measured) | reference full run (s, extrapolated) | speed-up | Spearman after "
        f"{args.ref_steps} steps | AUROC (sotjax) | Sinkhorn its / CG its |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dim']} | {r['steps']} | {r['first_total']:.2f} | {r['compile']:.2f} | {r['ours']:.2f} "
            f"| {r['ref_step']:.1f} | {r['ref_full']:.0f} | {r['ratio']:.0f}x | {r['rho_k']:.4f} | {r['auroc']:.4f} "
            f"| {r['sk']} / {r['adj']} |")
    lines += [
        "",
        f"Full-run agreement at n = {small['n']} (N_h = {small['n']}, d = 576, both run {small['steps']} steps): "
        f"Spearman {small['rho']:.4f}; AUROC sotjax {small['auroc_ours']:.4f}, reference {small['auroc_ref']:.4f}; "
        f"time sotjax {small['ours']:.2f} s (incl. compile), reference {small['ref']:.1f} s.",
        "",
    ]
    text = "\n".join(lines)
    _replace_section(args.out, "## Stage 1 at paper scale", text)
    print(text)


def _replace_section(path: Path, heading: str, text: str) -> None:
    """Replace the section starting at ``heading`` (up to the next '## ') or append it."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# sotjax benchmark results\n\n"
    start = old.find(heading)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(heading))
        new = old[:start] + text + (old[end + 1:] if end >= 0 else "")
    from sotjax.atomic import write_text_atomic

    write_text_atomic(path, new.rstrip("\n") + "\n")


if __name__ == "__main__":
    main()
