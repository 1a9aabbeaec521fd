r"""The ``dense-bf16`` plan: the bfloat16 Gibbs kernel in row blocks (:class:`sotjax.streaming.StoredKernel`).

Tolerances, from bfloat16's rounding. A bfloat16 has 8 significant bits; rounding to nearest leaves a
relative error of at most half a unit in the last place, :math:`u = 2^{-8}` (the spacing of
:math:`[1, 2)` is :math:`2^{-7}`). Each stored entry is :math:`\tilde K_{ij} = K_{ij}(1 + \delta_{ij})`,
:math:`|\delta_{ij}| \le u`, so:

(a) :math:`\tilde K` is the exact kernel of :math:`\tilde C = C - \varepsilon \log(1 + \delta)`,
    :math:`|\tilde C - C| \le \varepsilon\,|\log(1 - u)| = 1.002\,\varepsilon u` (checked entry-wise);
(b) the blocked solver is *exact* for :math:`\tilde C`: against the independent float64 reference run on
    :math:`\tilde C` (the stored kernel decoded) potentials, plan sums and products agree to float64
    round-off and the Sinkhorn threshold (the tolerances of ``tests/test_streaming.py``);
(c) against the reference on the true :math:`C`: :math:`\mathrm{OT}_\varepsilon` is a minimum over plans of
    :math:`\langle T, C\rangle + \varepsilon\mathrm{KL}`, each 1-Lipschitz in :math:`\|C\|_\infty` (a plan has
    mass 1), so :math:`|\mathrm{OT}_\varepsilon(\tilde C) - \mathrm{OT}_\varepsilon(C)| \le 1.002\,\varepsilon u`
    (rigorous);
(d) to first order a cost perturbation :math:`\eta` moves :math:`f_i` by the plan's conditional average of
    :math:`\eta_{i\cdot} - \Delta g` over its row (and :math:`g_j` likewise), hence the plan-invariant sums
    :math:`\Delta f_i + \Delta g_j` by at most :math:`2 \max|\eta| \approx 2 \varepsilon u` on a connected
    plan (first order, not a worst case: ill-conditioned plans amplify it; measured at most
    :math:`0.9\,\varepsilon u` here);
(e) every plan entry's exponent :math:`(f_i + g_j - C_{ij})/\varepsilon` then moves by at most
    :math:`(2 \varepsilon u + \varepsilon u)/\varepsilon = 3u`: plan products with non-negative vectors
    agree to the relative error :math:`e^{3u} - 1 \approx 3u` (measured at most :math:`0.8\,u`), and
    the cost sums :math:`(T\odot C)1` to :math:`3u\,(T \odot C)1 + \varepsilon u\, T1`.

The fits (float32) compare the ranking with the dense plan: the Spearman correlation of the logits and
the Top-80% overlap, with bounds measured on eight seeds of the same problem family (Spearman at least
0.999994, overlap at least 0.9979) and a margin (``SPEARMAN_BOUND``, ``TOP80_BOUND``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import reference as ref

from sotjax import streaming
from sotjax.errors import SotjaxInputError
from sotjax.plan import (
    BF16_TEMPORARIES,
    OVERHEAD_BYTES,
    VECTORS_PER_ROW,
    bf16_block_rows,
    bucket_rows,
    estimate_bytes,
    plan_memory,
)

U = 2.0**-8  # bfloat16's unit roundoff
COST_TOL = -np.log1p(-U)  # (a): |C~ - C| <= eps * COST_TOL
SPEARMAN_BOUND = 0.9999  # measured >= 0.999994 (8 seeds); 1 - rho with a 15x margin
TOP80_BOUND = 0.99  # measured >= 0.9979 (one swap at the boundary in 480)
GIB = 1 << 30


def problem(n=37, m=11, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(m, d))
    a = rng.uniform(0.2, 1.0, n)
    a /= a.sum()
    return x, y, a, np.full(m, 1.0 / m)


def decoded(geom: streaming.StoredKernel) -> np.ndarray:
    """The stored kernel as a float64 ``(n, m)`` matrix (real rows)."""
    blocks = np.asarray(streaming.bf16_bits_to(geom.k_blocks, np.float32), np.float64)
    return blocks.reshape(-1, geom.m)[: geom.n]


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("block_rows", [1, 8, 37, 100])
@pytest.mark.parametrize("shape,eps", [((37, 11, 5), 0.1), ((200, 40, 8), 0.07)])
def test_stored_kernel_solve_is_exact_for_its_cost_and_within_bf16_of_the_true_one(x64, block_rows, shape, eps):
    n, m, d = shape
    x, y, a, b = problem(n, m, d)
    geom, cost_max = streaming.stored_kernel(ref.unit(x), ref.unit(y), block_rows, eps)
    assert geom.k_blocks.dtype == streaming.KERNEL_BITS and geom.k_blocks.shape[1:] == (min(block_rows, n), m)
    C = ref.cosine_cost(x, y)
    assert cost_max == pytest.approx(C.max(), abs=1e-12)
    K = decoded(geom)
    C_tilde = -eps * np.log(K)
    # (a) one rounding per entry
    assert np.max(np.abs(K / np.exp(-C / eps) - 1.0)) <= U
    assert np.max(np.abs(C_tilde - C)) <= eps * COST_TOL
    out = streaming.sinkhorn(geom, a, b, eps, np.zeros(m), threshold=1e-12, max_iterations=50000)
    assert bool(out.converged)
    f, g = np.asarray(out.f), np.asarray(out.g)
    plan = streaming.StreamedPlan.from_solve(geom, a, b, eps, out)
    sums = plan.sums()
    rng = np.random.default_rng(1)
    v, z = rng.uniform(0.1, 1.0, m), rng.uniform(0.1, 1.0, n)  # non-negative: relative errors are meaningful
    Tv, zT = np.asarray(geom.unblock(plan.matvec(v))), np.asarray(plan.rmatvec(geom.blocks(z)))

    # (b) exact for C~
    ft, gt, Tt = ref.sinkhorn_log(C_tilde, a, b, eps)
    shift = np.mean(g - gt)
    np.testing.assert_allclose(f, ft - shift, atol=1e-9)
    np.testing.assert_allclose(g, gt + shift, atol=1e-9)
    assert float(out.reg_ot_cost(a, b)) == pytest.approx(ref.regularized_ot(C_tilde, a, b, eps), abs=1e-10)
    np.testing.assert_allclose(sums.row_mass, Tt.sum(1), atol=1e-11)
    np.testing.assert_allclose(sums.col_mass, Tt.sum(0), atol=1e-11)
    np.testing.assert_allclose(sums.row_cost, (Tt * C_tilde).sum(1), atol=1e-11)
    np.testing.assert_allclose(sums.col_cost, (Tt * C_tilde).sum(0), atol=1e-11)
    np.testing.assert_allclose(Tv, Tt @ v, atol=1e-11)
    np.testing.assert_allclose(zT, z @ Tt, atol=1e-11)
    r, c = Tt.sum(1), Tt.sum(0)
    np.testing.assert_allclose(plan.schur_matvec(v, geom.blocks(r, fill=1.0), c), c * v - Tt.T @ ((Tt @ v) / r),
                               atol=1e-10)

    # (c)-(e) bfloat16's effect against the true cost
    f0, g0, T0 = ref.sinkhorn_log(C, a, b, eps)
    assert abs(float(out.reg_ot_cost(a, b)) - ref.regularized_ot(C, a, b, eps)) <= eps * COST_TOL
    df, dg = f - f0, g - g0  # only the sums df_i + dg_j are defined (the plan's gauge)
    assert max(abs(df.max() + dg.max()), abs(df.min() + dg.min())) <= 2 * eps * COST_TOL
    rel = np.expm1(3 * COST_TOL)
    np.testing.assert_allclose(Tv, T0 @ v, rtol=rel, atol=0)
    np.testing.assert_allclose(zT, z @ T0, rtol=rel, atol=0)
    tc = T0 * C
    assert np.all(np.abs(np.asarray(sums.row_cost) - tc.sum(1)) <= rel * tc.sum(1) + eps * COST_TOL * a)
    assert np.all(np.abs(np.asarray(sums.col_cost) - tc.sum(0)) <= rel * tc.sum(0) + eps * COST_TOL * b)


def test_transport_gradient_of_the_stored_kernel_is_that_of_its_cost(x64):
    x, y, a, b = problem(n=14, m=6, d=4, seed=3)
    eps = 0.1
    geom, _ = streaming.stored_kernel(ref.unit(x), ref.unit(y), 4, eps)  # 16 rows: 2 of padding
    C_tilde = -eps * np.log(decoded(geom))
    out = streaming.sinkhorn(geom, a, b, eps, np.zeros(len(b)), threshold=1e-13, max_iterations=20000)
    plan = streaming.StreamedPlan.from_solve(geom, a, b, eps, out)
    value, grad, _ = streaming.transport_value_and_grad(plan, tol=1e-12, max_iterations=500)
    assert float(value) == pytest.approx(ref.transport_cost(C_tilde, a, b, eps), abs=1e-11)
    rng = np.random.default_rng(0)
    for _ in range(3):
        direction = rng.normal(size=a.size)
        direction -= direction.mean()
        h = 1e-6
        fd = (ref.transport_cost(C_tilde, a + h * direction, b, eps)
              - ref.transport_cost(C_tilde, a - h * direction, b, eps)) / (2 * h)
        assert float(np.dot(np.asarray(grad), direction)) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_stored_kernel_refuses_a_kernel_out_of_range():
    x, y, _, _ = problem(n=20, m=6, d=3, seed=1)
    with pytest.raises(SotjaxInputError, match=r"--plan dense-bf16: max C/epsilon = .* --epsilon"):
        streaming.stored_kernel(ref.unit(x).astype(np.float32), ref.unit(y).astype(np.float32), 8, 0.01)


def _fits(p, **config):
    import sotjax

    return {kind: sotjax.fit(p.corpus, p.safe, p.harmful, sotjax.SOTConfig.paper().replace(plan=kind, **config))
            for kind in ("dense", "dense-bf16")}


@pytest.mark.parametrize("seed", [1, 3])  # the smallest Top-80% overlap and Spearman of the 8 seeds measured
def test_bf16_fit_ranks_like_the_dense_fit(seed):
    from scipy.stats import spearmanr

    from sotjax.synthetic import make_problem

    n = 600
    p = make_problem(n=n, n_safe=20, n_harmful=100, dim=32, seed=seed)
    fits = _fits(p)
    dense, bf16 = fits["dense"], fits["dense-bf16"]
    assert dense.plan.kind == "dense" and bf16.plan.kind == "dense-bf16"
    assert bf16.plan.block_rows is not None and bf16.plan.padded_rows % bf16.plan.block_rows == 0
    assert bf16.converged and abs(bf16.n_steps - dense.n_steps) <= 1
    assert spearmanr(dense.logits, bf16.logits).statistic >= SPEARMAN_BOUND
    keep = int(0.8 * n)
    overlap = len(set(np.argsort(-dense.logits)[:keep]) & set(np.argsort(-bf16.logits)[:keep])) / keep
    assert overlap >= TOP80_BOUND
    # the harmful samples (the last 10%) are ranked out of the Top-80% alike
    for res in (dense, bf16):
        assert not np.any(p.is_harmful[np.argsort(-res.logits)[:keep]])


def test_planner_takes_bf16_between_dense_and_stream():
    refs, dim = (50, 5000), 384
    # the problem: 10^6 x 5050 fits 16 GiB as a bfloat16 kernel (dense would need 58 GiB)
    big = plan_memory(10**6, refs, dim, budget_bytes=16 * GIB, epsilon=0.1)
    assert big.kind == "dense-bf16" and big.estimated_bytes <= 16 * GIB < estimate_bytes("dense", 10**6, refs, dim)
    assert big.block_rows == bf16_block_rows(bucket_rows(10**6), refs) and big.padded_rows % big.block_rows == 0
    assert "bfloat16 kernel fits" in big.reason
    # the estimate is what is stored: one 2-byte kernel row per padded corpus row (not dense's three
    # float32 matrices), three float32 copies of the unit rows (the input; the device copy and the
    # normalised rows while the kernels are built), the O(n) vectors and the blocks' working copies
    n, M, pad, b = 10**6, sum(refs), big.padded_rows, big.block_rows
    assert big.estimated_bytes == (OVERHEAD_BYTES + 2 * pad * M + 4 * (n + M) * dim + 2 * 4 * pad * dim
                                   + VECTORS_PER_ROW * 4 * n + BF16_TEMPORARIES * 4 * b * M)
    assert plan_memory(10_000, refs, dim, budget_bytes=16 * GIB, epsilon=0.1).kind == "dense"
    assert plan_memory(3 * 10**6, refs, dim, budget_bytes=16 * GIB, epsilon=0.1).kind == "stream"
    # skipped where it cannot run: epsilon too small for the kernel's range (C reaches 2: needs >= 1/15),
    # epsilon unknown (relative), float64, the divergence loss
    for kwargs in ({"epsilon": 0.05}, {"epsilon": None}, {"epsilon": 0.1, "dtype": "float64"}):
        chosen = plan_memory(10**6, refs, dim, budget_bytes=16 * GIB, **kwargs)
        assert chosen.kind == "stream" and "no dense-bf16" in chosen.reason
    assert plan_memory(10**6, refs, dim, budget_bytes=16 * GIB, epsilon=2 / 30).kind == "dense-bf16"


@pytest.mark.parametrize("kwargs, match", [
    ({"epsilon": 0.05}, r"--plan dense-bf16: --epsilon 0\.05 is too small.*--epsilon >= 0\.0667"),
    ({"epsilon": None}, r"--plan dense-bf16: the absolute --epsilon is not known"),
    ({"epsilon": 0.1, "dtype": "float64"}, r"--plan dense-bf16: the bfloat16 kernel is float32-only"),
    ({"epsilon": 0.1, "loss": "divergence"}, r"--plan dense-bf16: the divergence loss"),
    ({"epsilon": 0.1, "budget_bytes": 8 * GIB}, r"--plan dense-bf16: needs about 14\.\d\d GiB, over the budget"),
])
def test_forced_bf16_is_refused_with_one_line(kwargs, match):
    kwargs = {"budget_bytes": 16 * GIB, **kwargs}
    with pytest.raises(SotjaxInputError, match=match) as info:
        plan_memory(10**6, (50, 5000), 384, kind="dense-bf16", **kwargs)
    assert "\n" not in str(info.value)


def test_fit_falls_to_bf16_when_dense_does_not_fit_and_refuses_small_epsilon():
    import sotjax
    from sotjax.synthetic import make_problem

    # n well above the block (B = 1048 rows against 2000 references): the 2-byte kernel is below dense's 12
    p = make_problem(n=3000, n_safe=10, n_harmful=2000, dim=16, seed=4)
    budget = estimate_bytes("dense-bf16", 3000, (10, 2000), 16) + (1 << 20)  # bf16 fits, dense does not
    assert estimate_bytes("dense", 3000, (10, 2000), 16) > budget
    res = sotjax.fit(p.corpus, p.safe, p.harmful, sotjax.SOTConfig.paper().replace(memory_budget=budget, steps=3))
    assert res.plan.kind == "dense-bf16" and res.plan.block_rows and np.isfinite(res.weights).all()
    assert res.geometry["harmful"].cost_max > 0
    small = sotjax.fit(p.corpus, p.safe, p.harmful,
                       sotjax.SOTConfig.paper().replace(memory_budget=budget, steps=3, epsilon=0.05))
    assert small.plan.kind == "stream" and "--epsilon 0.05 is too small" in small.plan.reason
    with pytest.raises(SotjaxInputError, match="--plan dense-bf16: .*--epsilon"):
        sotjax.fit(p.corpus, p.safe, p.harmful, sotjax.SOTConfig.paper().replace(plan="dense-bf16", epsilon=0.05))


SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    import sotjax
    from sotjax import streaming
    from sotjax.config import SOTConfig
    from sotjax.sharding import corpus_mesh
    assert len(jax.devices()) == 4, jax.devices()
    rng = np.random.default_rng(0)
    n, d = 203, 16                      # 203 = 4 * 50 + 3: padding on the last device
    x = rng.normal(size=(n, d))
    x[:20] -= 1.5                       # 20 samples near the harmful reference
    s, h = rng.normal(size=(7, d)) + 1.0, rng.normal(size=(30, d)) - 1.5
    out = {}
    for plan in ("dense-bf16", "dense"):
        for devices in (1, 4):
            cfg = SOTConfig.entropic(0.03).replace(plan=plan, devices=devices, steps=60)
            r = sotjax.fit(x, s, h, cfg)
            out[f"{plan}/{devices}"] = {"weights": r.weights.tolist(), "steps": r.n_steps, "plan": r.plan.to_dict()}
    # the solve itself on a mesh (100 iterations each): blocks split, potentials as on one device
    unit = lambda v: (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    xu, hu = np.zeros((224, d), np.float32), unit(h)
    xu[:n] = unit(x)
    a = np.where(np.arange(224) < n, 1.0 / n, 0.0).astype(np.float32)
    b = np.full(30, 1 / 30, np.float32)
    pots = {}
    for devices in (1, 4):
        geom, _ = streaming.stored_kernel(xu, hu, 56, 0.1, corpus_mesh(devices), rows=n)
        res = streaming.sinkhorn(geom, a, b, np.float32(0.1), np.zeros(30, np.float32), -1.0, 100)  # 100 its
        kernel = np.asarray(streaming.bf16_bits_to(geom.k_blocks, np.float32)).reshape(-1, 30)[:n]
        pots[devices] = {"f": np.asarray(res.f)[:n].tolist(), "g": np.asarray(res.g).tolist(),
                         "kernel": kernel.tolist(),
                         "devices": len(geom.k_blocks.sharding.device_set),
                         "spec": str(getattr(geom.k_blocks.sharding, "spec", "single"))}
    out["solve"] = pots
    json.dump(out, sys.stdout)
''')


def test_four_devices_give_the_single_device_weights():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    one, four = runs["dense-bf16/1"], runs["dense-bf16/4"]
    w1, w4 = np.asarray(one["weights"]), np.asarray(four["weights"])
    assert w1.shape == w4.shape == (203,) and w1.sum() == pytest.approx(1.0, abs=1e-5)
    assert w1[:20].mean() < 0.5 * w1[20:].mean()  # the harmful cluster is down-weighted
    assert np.abs(w4 - w1).sum() / w1.sum() <= 1e-5  # as the float32 plans of tests/test_sharding.py
    assert one["steps"] == four["steps"]
    plan1, plan4 = one["plan"], four["plan"]
    assert plan1["kind"] == plan4["kind"] == "dense-bf16"
    assert plan1["sharded_devices"] == 1 and plan4["sharded_devices"] == 4
    assert plan4["padded_rows"] % (4 * plan4["block_rows"]) == 0 and plan4["padded_rows"] >= 203
    dense = np.asarray(runs["dense/4"]["weights"])
    assert np.abs(w4 - dense).sum() <= 1e-3
    solve = runs["solve"]
    assert solve["4"]["devices"] == 4 and "'data'" in solve["4"]["spec"]
    # the kernel is computed per device: a cost that differs in its last float32 bit (another GEMM
    # schedule) can round to the neighbouring bfloat16, one ulp = 2u relative; that moves the cost of the
    # entry by 2 eps u and the potentials by at most as much
    k1, k4 = np.asarray(solve["1"]["kernel"]), np.asarray(solve["4"]["kernel"])
    flips = k4 != k1
    assert np.all(np.abs(k4 / k1 - 1) <= 2 * U * (1 + 1e-6)) and flips.mean() <= 1e-3
    np.testing.assert_allclose(solve["4"]["f"], solve["1"]["f"], atol=2 * 0.1 * U if flips.any() else 1e-5)
    np.testing.assert_allclose(solve["4"]["g"], solve["1"]["g"], atol=2 * 0.1 * U if flips.any() else 1e-5)
