"""Throughput of the linkage audit (:func:`sotjax.audit.audit`): rows per second, per backend.

Workload: a corpus of n random rows (d = 384, standard normal, stored as a float16 ``.npy`` and
memory-mapped, as ``sotjax audit`` reads it), N_s = 1000 safe and N_h = 5000 harmful random rows,
with planted near-copies (a row plus Gaussian noise of 10% of its norm: cosine ~0.995) and exact
copies: within the corpus (n/100 pairs, a third exact), corpus-safe (20), corpus-harmful (20) and
safe-harmful (5), all on disjoint rows. Random rows at d = 384 have cosines of about ±0.05 (the
largest of 5·10⁹ pairs ~0.35), so every link above the threshold 0.95 is a planted one: the script
checks that the audit finds exactly the planted pairs.

Reported per (n, backend): seconds of the whole audit (normalising the memory-mapped rows, the
four blocked searches, the clusters), rows per second ((n + N_s + N_h) / seconds), the cosine pairs
scored per second (n(n-1)/2 + n(N_s + N_h) + N_s N_h), the GFLOP/s of those products (2 d flops per
pair) and whether the planted pairs were all found and nothing else. The first call of each
backend is a warm-up on a small input (JAX compiles its tile program once per shape).

Usage: python benchmarks/bench_audit.py [--n 10000,100000] [--backends numpy,jax] [--block-rows 2048]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name  # noqa: E402

D = 384
N_SAFE, N_HARMFUL = 1000, 5000


def make_sets(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """Random corpus/safe/harmful with planted copies on disjoint rows; the planted counts."""
    rng = np.random.default_rng(seed)
    corpus = rng.standard_normal((n, D)).astype(np.float32)
    safe = rng.standard_normal((N_SAFE, D)).astype(np.float32)
    harmful = rng.standard_normal((N_HARMFUL, D)).astype(np.float32)

    def near(x: np.ndarray, exact: bool) -> np.ndarray:
        if exact:
            return x.copy()
        return x + 0.1 * np.linalg.norm(x, axis=-1, keepdims=True) / np.sqrt(D) * rng.standard_normal(x.shape)

    rows = rng.permutation(n)
    n_dup = n // 100
    base, copy = rows[:n_dup], rows[n_dup:2 * n_dup]
    for k, (i, j) in enumerate(zip(base, copy, strict=True)):
        corpus[j] = near(corpus[i], exact=k % 3 == 0)
    cs, ch = rows[2 * n_dup:2 * n_dup + 20], rows[2 * n_dup + 20:2 * n_dup + 40]
    safe[:20] = near(corpus[cs], exact=False)
    harmful[:20] = near(corpus[ch], exact=False)
    harmful[20:25] = near(safe[20:25], exact=False)
    planted = {"corpus-corpus": n_dup, "corpus-safe": 20, "corpus-harmful": 20, "safe-harmful": 5}
    return corpus, safe, harmful, planted


def run_one(corpus_path: Path, safe: np.ndarray, harmful: np.ndarray, backend: str, block_rows: int
            ) -> tuple[float, object]:
    from sotjax import audit as A
    from sotjax.io import open_npy

    corpus = open_npy(corpus_path)
    t = time.perf_counter()
    result = A.audit(corpus, safe, harmful, backend=backend, block_rows=block_rows)
    return time.perf_counter() - t, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", default="10000,100000")
    p.add_argument("--backends", default="numpy,jax")
    p.add_argument("--block-rows", type=int, default=2048)
    args = p.parse_args()
    sizes = [int(float(v)) for v in args.n.split(",")]
    backends = args.backends.split(",")
    from sotjax import audit as A

    w = np.random.default_rng(1).standard_normal((300, D)).astype(np.float32)
    for backend in backends:  # warm-up: imports, JAX's compilation of the full-size tile
        A.audit(w, w[:50], w[:60], backend=backend, block_rows=args.block_rows)
        A.audit(np.random.default_rng(2).standard_normal((2 * args.block_rows + 3, D)), w, w,
                backend=backend, block_rows=args.block_rows)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            corpus, safe, harmful, planted = make_sets(n)
            path = Path(tmp) / f"corpus_{n}.npy"
            np.save(path, corpus.astype(np.float16))
            del corpus
            for backend in backends:
                seconds, result = run_one(path, safe, harmful, backend, args.block_rows)
                counts = {k: v["links"] for k, v in result.summary()["pairs"].items()}  # type: ignore[attr-defined]
                pairs = n * (n - 1) / 2 + n * (N_SAFE + N_HARMFUL) + N_SAFE * N_HARMFUL
                rows.append({"n": n, "backend": backend, "seconds": seconds,
                             "rows_per_s": (n + N_SAFE + N_HARMFUL) / seconds, "pairs_per_s": pairs / seconds,
                             "gflops": 2 * D * pairs / seconds / 1e9, "exact": counts == planted,
                             "timings": result.timings})  # type: ignore[attr-defined]
                print(f"n={n} {backend}: {seconds:.2f} s, links {counts} (planted {planted})", file=sys.stderr)
    load_after = os.getloadavg()
    print(f"\n### Linkage audit throughput ({datetime.date.today()}, {cpu_name()}, "
          f"{os.cpu_count()} cores, load average {load_before[0]:.2f} before / {load_after[0]:.2f} after)\n")
    print(f"d = {D}, N_s = {N_SAFE}, N_h = {N_HARMFUL}, threshold 0.95, top_k {A.DEFAULT_TOP_K}, "
          f"block {args.block_rows} rows, corpus float16 .npy memory-mapped\n")
    print("| n | backend | seconds | rows/s | pairs/s | GFLOP/s | planted pairs found exactly |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['backend']} | {r['seconds']:.2f} | {r['rows_per_s']:,.0f} | "
              f"{r['pairs_per_s']:.3g} | {r['gflops']:.1f} | {'yes' if r['exact'] else 'NO'} |")


if __name__ == "__main__":
    main()
