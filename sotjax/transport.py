r"""Entropic OT losses of a weighted corpus against a fixed reference, with their gradients
in the corpus weights ``a``.

Conventions. For a geometry with cost :math:`C \in \mathbb{R}^{n\times m}` and marginals
:math:`a \in \Delta_n`, :math:`b \in \Delta_m`, the entropic problem is

.. math::
    \mathrm{OT}_\varepsilon(a, b) = \min_{T \in \Pi(a,b)} \langle T, C\rangle
        + \varepsilon\,\mathrm{KL}(T \,\|\, a b^\top),

with optimal plan :math:`T^\star_{ij} = a_i b_j \exp((\tilde f_i + \tilde g_j - C_{ij})/\varepsilon)`.
We carry the *centred* potentials :math:`\tilde f = f - \varepsilon\log a`,
:math:`\tilde g = g - \varepsilon \log b`, where ``f, g`` are ott-jax's potentials (whose plan is
:math:`e^{(f_i+g_j-C_{ij})/\varepsilon}`). Centred potentials barely move when ``a`` moves, which
makes them the right warm start for the next solve, and they are the gradients:

* ``regularized``: :math:`\nabla_a \mathrm{OT}_\varepsilon = \tilde f` (envelope theorem; no linear
  solve). Gradients are defined up to an additive constant, which the softmax removes.
* ``transport`` (paper Eq. 6): :math:`L = \langle T^\star, C\rangle`. Writing
  :math:`T = \mathrm{diag}(e^\alpha) K \mathrm{diag}(e^\beta)`, the marginal conditions
  :math:`T1 = r`, :math:`T^\top 1 = c` have Jacobian
  :math:`H = \begin{psmallmatrix} \mathrm{diag}(r) & T \\ T^\top & \mathrm{diag}(c)\end{psmallmatrix}`
  in :math:`(\alpha, \beta)`, and :math:`dL = \langle c_r, d\alpha\rangle + \langle c_c, d\beta\rangle`
  with :math:`c_r = (T\odot C)1`, :math:`c_c = (T\odot C)^\top 1`. Implicit differentiation gives
  :math:`\nabla_a L = x` where :math:`H (x, y) = (c_r, c_c)`. We eliminate ``x`` (Schur complement on
  the reference side, size ``m``):

  .. math::
      S y = c_c - T^\top (c_r / r),\quad S = \mathrm{diag}(c) - T^\top \mathrm{diag}(r)^{-1} T,
      \qquad x = (c_r - T y)/r,

  solved directly when ``n m^2`` is small (the safe anchor) and by Jacobi-preconditioned conjugate
  gradients otherwise. With :math:`y \to -y`, ``H`` is the Laplacian of the bipartite graph whose
  edge weights are the plan's entries, so ``S`` is singular along :math:`\mathbf 1` (shifting
  :math:`\alpha \to \alpha + t`, :math:`\beta \to \beta - t` leaves ``T`` unchanged) and *nearly*
  singular along one more direction per extra connected component of the plan's numerical support.
  That happens at small :math:`\varepsilon`: entries :math:`e^{-\Delta/\varepsilon}` underflow, and at a
  degenerate point (uniform ``a`` and ``b`` with :math:`\gcd(n, m) > 1`, the first step of every fit)
  the unregularised plan is a forest, not a spanning tree. A plain LU solve then returns NaN or
  :math:`10^{16}`-sized offsets between components. The direct solve therefore uses the
  Jacobi-scaled Schur complement :math:`\hat S = D^{-1/2} S D^{-1/2}` (:math:`D = \mathrm{diag}(c)`,
  eigenvalues in :math:`[0, 1]`) and its pseudo-inverse: eigen-directions with
  :math:`\lambda \le 10\,m\,u` (``u`` the machine epsilon of the dtype: the entries of
  :math:`\hat S` carry rounding errors of order ``u``, so by Weyl's inequality its eigenvalues are known
  to about :math:`m u`, and smaller ones are indistinguishable from 0) are dropped. On a connected
  support this is the same solution up to the constant the softmax removes; across numerically
  disconnected components it picks the minimum-norm offsets: the exact derivative there is set by
  entries below the dtype's range, so every offset is equally consistent with the computed plan, and
  this one is finite. CG from zero stays in the range likewise.
  This replaces ott-jax's generic implicit differentiation, which on the paper-scale problem took 18.7 s
  per gradient here (see ``benchmarks/RESULTS.md``), with the plan materialised once per step.
* the Sinkhorn divergence :math:`S_\varepsilon(a,b) = \mathrm{OT}_\varepsilon(a,b) -
  \tfrac12\mathrm{OT}_\varepsilon(a,a) - \tfrac12\mathrm{OT}_\varepsilon(b,b)` is assembled in
  :mod:`sotjax.objective` from :func:`regularized_loss` and :func:`self_transport`: gradient
  :math:`\tilde f_{ab} - \tilde p_{aa}`, with :math:`\tilde p_{aa}` the symmetric centred potential
  of the corpus self-transport (:math:`\nabla_a \tfrac12\mathrm{OT}_\varepsilon(a,a) = \tilde p_{aa}`).

Small :math:`\varepsilon`: the Newton fallback. Warm-started Sinkhorn (ott-jax) is tried first, with
its iteration cap. Sinkhorn converges linearly at a rate set by the plan's weakest links: when the
unregularised plan has a tree edge of mass :math:`\delta` (near-degenerate marginals) it needs
:math:`\sim 1/\delta` iterations, and when a potential must move by :math:`\Delta \gg \varepsilon` it
moves by :math:`O(\varepsilon)` per iteration (measured: at :math:`\varepsilon = 10^{-6}` it stalled at a
marginal error of 0.27 after 200 000 iterations). A solve that misses its threshold is therefore
finished by :func:`_newton_solve`: damped Newton steps on the concave dual

.. math::
    \Phi(f, g) = \langle f, a\rangle + \langle g, b\rangle - \varepsilon \textstyle\sum_{ij}
    e^{(f_i + g_j - C_{ij})/\varepsilon},\qquad
    \nabla\Phi = (a - T1,\; b - T^\top 1),\qquad \nabla^2\Phi = -H/\varepsilon,

(the Newton direction :math:`(\varepsilon u, \varepsilon v)` solves :math:`H(u, v) = \nabla\Phi`, with
the same Schur elimination and pseudo-inverse as the adjoint, and an Armijo backtracking line search
on :math:`\Phi` evaluated as the increment
:math:`\Delta\Phi/\varepsilon = t(\langle a,u\rangle + \langle b,v\rangle) - \sum_{ij} T_{ij}\,
\mathrm{expm1}(t(u_i + v_j))` so that it is exact in float32), each followed by one Sinkhorn sweep
(which makes the row marginals exact). Newton converges quadratically once the potentials are within
:math:`O(\varepsilon)` of the solution; if ``NEWTON_STEPS`` steps at the target do not reach the
threshold, the solve is restarted by :math:`\varepsilon`-scaling: :math:`\varepsilon_k =
\max(\varepsilon, C_{\max} 2^{-k})`, three sweeps and up to ``NEWTON_STEPS`` Newton steps per stage.
The fallback runs only in log mode and only when the first solve missed its threshold (a
``lax.cond``), so solves that converge are unchanged. What it cannot beat is the dtype: in float32 the exponent
:math:`(f_i + g_j - C_{ij})/\varepsilon` carries a rounding error of about
:math:`6\cdot 10^{-8}/\varepsilon`, which puts a floor under the marginal error (measured
:math:`3\cdot 10^{-4}` at :math:`\varepsilon = 10^{-4}`, :math:`4\cdot 10^{-2}` at :math:`10^{-6}`);
such solves are reported as not converged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import acceleration, sinkhorn

from sotjax import streaming

# Reference sides up to this many flops (n * m^2) get a dense direct adjoint solve.
DIRECT_ADJOINT_MAX_FLOPS = 2e8
# Newton fallback: steps per stage, sweeps per annealing stage, backtracking halvings.
NEWTON_STEPS = 30
STAGE_SWEEPS = 3
LINE_SEARCH_HALVINGS = 30


@dataclasses.dataclass(frozen=True)
class SinkhornSettings:
    """Inner-solver settings (hashable: passed as a static argument to jitted code).

    ``max_iterations`` caps the warm-started Sinkhorn solve; ``newton_fallback`` finishes a solve that
    missed ``threshold`` by damped Newton (module docstring), whose own cap is ``NEWTON_STEPS`` steps
    per stage.
    """

    threshold: float = 1e-4
    max_iterations: int = 2000
    adjoint_tol: float = 1e-5
    adjoint_max_iterations: int = 500
    newton_fallback: bool = True


class Potentials(NamedTuple):
    """Centred dual potentials ``(f~, g~)``: the warm start carried between solves."""

    f: jax.Array
    g: jax.Array


class SinkhornSolve(NamedTuple):
    r"""One balanced entropic OT solve: ott-jax potentials (plan :math:`e^{(f_i+g_j-C_{ij})/\varepsilon}`)
    and diagnostics.

    ``n_iters`` counts Sinkhorn sweeps plus Newton steps; ``error`` is the final L1 marginal error
    (ott-jax's criterion); ``converged`` is ``error < threshold`` with finite potentials;
    ``fallback`` says whether the Newton fallback ran.
    """

    geom: geometry.Geometry
    a: jax.Array
    b: jax.Array
    f: jax.Array
    g: jax.Array
    n_iters: jax.Array
    converged: jax.Array
    error: jax.Array
    reg_ot_cost: jax.Array
    fallback: jax.Array

    @property
    def scalings(self) -> tuple[jax.Array, jax.Array]:
        eps = self.geom.epsilon
        return jnp.exp(self.f / eps), jnp.exp(self.g / eps)


class LossOutput(NamedTuple):
    """One loss evaluation: value, gradient in ``a`` and solver diagnostics."""

    value: jax.Array
    grad_a: jax.Array
    potentials: Potentials
    sinkhorn_iterations: jax.Array
    sinkhorn_converged: jax.Array
    adjoint_iterations: jax.Array
    adjoint_converged: jax.Array
    sinkhorn_error: jax.Array


def zero_potentials(n: int, m: int, dtype: jnp.dtype) -> Potentials:
    return Potentials(jnp.zeros((n,), dtype), jnp.zeros((m,), dtype))


def _uses_kernel(geom: geometry.Geometry) -> bool:
    # ott stores a user-provided kernel in ``_kernel_matrix``; cosine_geometry provides one
    # exactly when kernel mode was chosen.
    return geom._kernel_matrix is not None  # noqa: SLF001 - reading our own construction


def _safe_log(x: jax.Array) -> jax.Array:
    return jnp.log(jnp.maximum(x, jnp.finfo(x.dtype).tiny))


def _cost(geom: geometry.Geometry) -> jax.Array:
    cost = geom.cost_matrix
    assert cost is not None, "sotjax geometries are dense: they always hold the cost matrix"
    return cost


def _log_plan(cost: jax.Array, f: jax.Array, g: jax.Array, eps: jax.Array) -> jax.Array:
    return (f[:, None] + g[None, :] - cost) / eps


def _sweep(cost, log_a, log_b, f, g, eps):
    r"""One alternating log-domain Sinkhorn sweep: :math:`g \leftarrow \varepsilon\log b -
    \varepsilon\,\mathrm{lse}_i((f_i - C_{ij})/\varepsilon)`, then the same for ``f``. Returns the new
    potentials and the L1 column-marginal error :math:`\|T^\top 1 - b\|_1` after the sweep (rows exact)."""
    g = eps * log_b - eps * logsumexp((f[:, None] - cost) / eps, axis=0)
    f = eps * log_a - eps * logsumexp((g[None, :] - cost) / eps, axis=1)
    col = jnp.exp(g / eps + logsumexp((f[:, None] - cost) / eps, axis=0))
    return f, g, jnp.sum(jnp.abs(col - jnp.exp(log_b)))


def _finite_or(x: jax.Array, fallback: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(x), x, fallback)


def solve_sinkhorn(
    geom: geometry.Geometry,
    a: jax.Array,
    b: jax.Array,
    init: Potentials,
    settings: SinkhornSettings,
    symmetric: bool = False,
) -> tuple[SinkhornSolve, Potentials]:
    r"""Balanced entropic OT with ott-jax, warm-started from centred potentials, then the Newton
    fallback if the threshold was missed.

    The warm start is :math:`f = \tilde f + \varepsilon \log a` (log mode) or
    :math:`u = e^{f/\varepsilon}` (kernel mode). No autodiff goes through the solver: the
    gradients are formed explicitly (module docstring), so ``implicit_diff`` is off.
    ``symmetric=True`` (for :math:`\mathrm{OT}_\varepsilon(a, a)`) uses the averaged parallel
    updates of Feydy et al. (2019, Eq. 25) -- what ott-jax's Sinkhorn divergence uses for its
    symmetric terms; alternating updates oscillate there (16k iterations instead of ~10 at 1e-13).
    The fallback (module docstring) runs in log mode only: kernel mode is what ``lse_mode="auto"`` picks
    when :math:`\max C/\varepsilon` is small and Sinkhorn converges fast, and compiling the fallback there
    too would cost every default run ~1.3 s of compilation (measured, two references); a kernel-mode solve
    that misses its threshold is reported, with ``--lse-mode log`` as the remedy.
    """
    eps = geom.epsilon
    kernel = _uses_kernel(geom)
    f0, g0 = _balance_gauge(init.f + eps * _safe_log(a), init.g + eps * _safe_log(b), a, b)
    start = (jnp.exp(f0 / eps), jnp.exp(g0 / eps)) if kernel else (f0, g0)
    momentum = acceleration.Momentum()  # start=0: a constant weight from the first iteration
    momentum.value = 0.5  # (a plain dataclass: mypy does not see its generated __init__)
    solver = sinkhorn.Sinkhorn(
        lse_mode=not kernel,
        threshold=settings.threshold,
        max_iterations=settings.max_iterations,
        inner_iterations=1,
        implicit_diff=None,
        parallel_dual_updates=symmetric,
        momentum=momentum if symmetric else None,
    )
    out = solver(linear_problem.LinearProblem(geom, a, b), init=start)
    errors = out.errors
    assert errors is not None and out.reg_ot_cost is not None
    recorded = errors[errors.shape[0] - 1 - jnp.argmax((errors >= 0)[::-1])]  # last recorded error
    f, g = out.f, out.g
    finite = jnp.all(jnp.isfinite(f)) & jnp.all(jnp.isfinite(g)) & jnp.isfinite(out.reg_ot_cost)
    converged = jnp.asarray(out.converged) & finite
    result = (f, g, jnp.asarray(out.n_iters), converged, recorded, out.reg_ot_cost, jnp.asarray(False))
    if settings.newton_fallback and not kernel:
        cost = _cost(geom)

        def fallback(_):
            start_f, start_g = _finite_or(f, f0), _finite_or(g, g0)
            nf, ng, steps, err = _newton_solve(cost, a, b, start_f, start_g, eps, settings)
            ok = (err < settings.threshold) & jnp.all(jnp.isfinite(nf)) & jnp.all(jnp.isfinite(ng))
            return nf, ng, out.n_iters + steps, ok, err, _reg_ot_cost(cost, a, b, nf, ng, eps), jnp.asarray(True)

        result = jax.lax.cond(converged, lambda _: result, fallback, None)
    f, g, n_iters, converged, error, reg_cost, used = result
    f, g = _balance_gauge(f, g, a, b)
    solve = SinkhornSolve(geom, a, b, f, g, n_iters, converged, error, reg_cost, used)
    centred = Potentials(f - eps * _safe_log(a), g - eps * _safe_log(b))
    return solve, centred


def _balance_gauge(f: jax.Array, g: jax.Array, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""Shift to :math:`(f + t, g - t)` (the plan is unchanged) with :math:`\langle a, f\rangle = \langle b, g\rangle`.

    Warm-started solves leave this gauge free, and over a fit it drifted to :math:`|f|, |g| \approx 60`
    (measured, float32, :math:`\varepsilon = 10^{-3}`), where the float32 spacing :math:`4\cdot10^{-6}`
    divided by :math:`\varepsilon` made the exponent of every plan entry uncertain by 0.4%: the marginal
    error stalled at :math:`3\cdot 10^{-3}`. Balanced, both are :math:`O(\max C)`.
    """
    t = 0.5 * (jnp.vdot(b, g) - jnp.vdot(a, f)) / jnp.maximum(jnp.sum(a), jnp.finfo(a.dtype).tiny)
    return f + t, g - t


def _reg_ot_cost(cost, a, b, f, g, eps):
    r""":math:`\mathrm{OT}_\varepsilon = \langle a, \tilde f\rangle + \langle b, \tilde g\rangle
    + \varepsilon(1 - \sum_{ij} T_{ij})` (the dual value; ott-jax's ``reg_ot_cost``, balanced case)."""
    total = jnp.sum(jnp.exp(_log_plan(cost, f, g, eps)))
    return (jnp.vdot(a, f - eps * _safe_log(a)) + jnp.vdot(b, g - eps * _safe_log(b))
            + eps * (jnp.sum(a) * jnp.sum(b) - total))


def _newton_stage(cost, a, b, f, g, eps, settings: SinkhornSettings, direct: bool, sweeps):
    r"""At one :math:`\varepsilon`: ``sweeps`` Sinkhorn sweeps, then damped Newton steps (each followed
    by a sweep) until the marginal error is below the threshold or ``NEWTON_STEPS`` steps.
    Returns ``(f, g, sweeps + steps, error)``."""
    log_a, log_b = _safe_log(a), _safe_log(b)

    def sweep_body(_, state):
        f, g, _err = state
        return _sweep(cost, log_a, log_b, f, g, eps)

    f, g, err = jax.lax.fori_loop(0, sweeps, sweep_body, (f, g, jnp.asarray(jnp.inf, cost.dtype)))

    def cond(state):
        _, _, err, k, stalled = state
        return (err >= settings.threshold) & (k < NEWTON_STEPS) & ~stalled

    def body(state):
        f, g, _, k, _ = state
        nf, ng, t = _newton_step(cost, a, b, f, g, eps, settings, direct)
        nf, ng, err = _sweep(cost, log_a, log_b, nf, ng, eps)
        ok = jnp.all(jnp.isfinite(nf)) & jnp.all(jnp.isfinite(ng)) & jnp.isfinite(err)
        return (jnp.where(ok, nf, f), jnp.where(ok, ng, g), jnp.where(ok, err, jnp.inf), k + 1, (t == 0) | ~ok)

    f, g, err, k, _ = jax.lax.while_loop(cond, body, (f, g, err, jnp.asarray(0), jnp.asarray(False)))
    return f, g, sweeps + k, err


def _newton_solve(cost, a, b, f, g, eps, settings: SinkhornSettings):
    r"""The fallback: Newton at the target :math:`\varepsilon` from the given potentials (stage -1, one
    sweep first); if that misses the threshold, :math:`\varepsilon`-scaling :math:`\varepsilon_k =
    \max(\varepsilon, C_{\max} 2^{-k})`, ``STAGE_SWEEPS`` sweeps per stage, down to the target (module
    docstring). One loop over the stages, so the Newton step is traced once. Returns ``(f, g, steps, error)``."""
    n, m = cost.shape
    direct = n * m * m <= DIRECT_ADJOINT_MAX_FLOPS
    eps_hi = jnp.maximum(eps, jnp.max(cost))

    def body(state):
        f, g, steps, _, level, _ = state
        eps_k = jnp.where(level < 0, eps, jnp.maximum(eps, eps_hi * 0.5 ** jnp.maximum(level, 0)))
        sweeps = jnp.where(level < 0, 1, STAGE_SWEEPS)
        f, g, k, err = _newton_stage(cost, a, b, f, g, eps_k, settings, direct, sweeps)
        at_target = eps_k <= eps
        done = at_target & ((err < settings.threshold) | (level >= 0))
        return f, g, steps + k, err, level + 1, done

    init = (f, g, jnp.asarray(0), jnp.asarray(jnp.inf, cost.dtype), jnp.asarray(-1), jnp.asarray(False))
    f, g, steps, err, _, _ = jax.lax.while_loop(lambda s: ~s[5], body, init)
    return f, g, steps, err


def _newton_step(cost, a, b, f, g, eps, settings: SinkhornSettings, direct: bool):
    r"""One damped Newton step on the dual :math:`\Phi` (module docstring); returns ``(f, g, t)``."""
    log_t = _log_plan(cost, f, g, eps)
    plan = jnp.exp(log_t)
    tiny = jnp.finfo(plan.dtype).tiny
    r = jnp.maximum(jnp.sum(plan, axis=1), tiny)
    c = jnp.sum(plan, axis=0)
    rho, sigma = a - r, b - c
    v = _schur_solve(plan, r, c, sigma - (rho / r) @ plan, direct, settings)
    u = (rho - plan @ v) / r
    slope = jnp.vdot(rho, u) + jnp.vdot(sigma, v)  # directional derivative of Phi / eps at t = 0
    lin = jnp.vdot(a, u) + jnp.vdot(b, v)

    def gain(t):
        s = t * (u[:, None] + v[None, :])
        # exp(log_t + s) - exp(log_t), accurate for small s, overflow-safe (-> -inf gain) for large s
        large = jnp.exp(jnp.minimum(log_t + s, 700.0)) - plan
        change = jnp.where(s > 1.0, large, plan * jnp.expm1(jnp.minimum(s, 1.0)))
        return t * lin - jnp.sum(change)

    def cond(state):
        t, k = state
        ok = gain(t) >= 1e-4 * t * slope
        return ~ok & (k < LINE_SEARCH_HALVINGS)

    t, k = jax.lax.while_loop(cond, lambda s: (0.5 * s[0], s[1] + 1), (jnp.asarray(1.0, cost.dtype), jnp.asarray(0)))
    usable = (k < LINE_SEARCH_HALVINGS) & (slope > 0) & jnp.isfinite(slope)
    t = jnp.where(usable, t, 0.0)
    return f + t * eps * u, g + t * eps * v, t


def _schur_solve(plan: jax.Array, r: jax.Array, c: jax.Array, rhs: jax.Array, direct: bool,
                 settings: SinkhornSettings) -> jax.Array:
    r"""Solve :math:`(\mathrm{diag}(c) - T^\top \mathrm{diag}(r)^{-1} T)\, y = \mathrm{rhs}` (module
    docstring): pseudo-inverse of the Jacobi-scaled matrix when ``direct``, else Jacobi PCG."""
    tiny = jnp.finfo(plan.dtype).tiny
    if direct:
        return _pinv_schur_solve((plan.T / r) @ plan, c, rhs)

    def matvec(v):
        return c * v - ((plan @ v) / r) @ plan

    y, _ = _pcg(matvec, rhs, 1.0 / jnp.maximum(c, tiny), settings.adjoint_tol, settings.adjoint_max_iterations)
    return y


def _pinv_schur_solve(gram: jax.Array, c: jax.Array, rhs: jax.Array) -> jax.Array:
    r"""Minimum-norm solution (in the Jacobi-scaled variables) of :math:`(\mathrm{diag}(c) - G) y = \mathrm{rhs}`
    with :math:`G = T^\top \mathrm{diag}(r)^{-1} T`: :math:`y = D^{-1/2} \hat S^{+} D^{-1/2}\,\mathrm{rhs}`,
    :math:`\hat S = I - D^{-1/2} G D^{-1/2}`, eigenvalues below :math:`10\,m\,u` treated as 0."""
    dtype = gram.dtype
    d = jax.lax.rsqrt(jnp.maximum(c, jnp.finfo(dtype).tiny))
    scaled = jnp.eye(c.shape[0], dtype=dtype) - d[:, None] * gram * d[None, :]
    lam, vecs = jnp.linalg.eigh(0.5 * (scaled + scaled.T))
    cutoff = 10.0 * max(gram.shape) * jnp.finfo(dtype).eps * jnp.maximum(jnp.max(lam), 1.0)
    keep = lam > cutoff
    inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
    return d * (vecs @ (inv * (vecs.T @ (d * rhs))))


class _PlanOperator(NamedTuple):
    r"""Products with the plan :math:`T` and its marginal/cost sums, without forming ``T``.

    Kernel mode: :math:`T = \mathrm{diag}(u) K \mathrm{diag}(v)`, and :math:`T\odot C` uses the
    precomputed :math:`K \odot C` of :class:`~sotjax.geometry.KernelGeometry`: every quantity is a
    matrix-vector product. Log mode materialises ``T`` once.
    """

    matvec: Callable[[jax.Array], jax.Array]  # y -> T y
    rmatvec: Callable[[jax.Array], jax.Array]  # z -> T^T z (computed as z @ T)
    row_cost: jax.Array  # (T * C) 1
    col_cost: jax.Array  # (T * C)^T 1
    row_mass: jax.Array  # T 1
    col_mass: jax.Array  # T^T 1


def _plan_matrix(out: SinkhornSolve) -> jax.Array:
    r"""The dense plan :math:`e^{(f_i + g_j - C_{ij})/\varepsilon}` from the potentials, in either mode (in
    kernel mode :math:`u_i K_{ij} v_j` is :math:`\infty \cdot 0` once a forced kernel underflows)."""
    return out.geom.transport_from_potentials(out.f, out.g)


def _plan_operator(out: SinkhornSolve, materialize: bool) -> _PlanOperator:
    geom = out.geom
    if _uses_kernel(geom) and not materialize and hasattr(geom, "weighted_cost"):
        u, v = out.scalings
        kernel, kc = geom.kernel_matrix, geom.weighted_cost
        return _PlanOperator(
            matvec=lambda y: u * (kernel @ (v * y)),
            rmatvec=lambda z: v * ((z * u) @ kernel),
            row_cost=u * (kc @ v),
            col_cost=v * (u @ kc),
            row_mass=u * (kernel @ v),
            col_mass=v * (u @ kernel),
        )
    plan = _plan_matrix(out)
    weighted = plan * _cost(geom)
    ones_n = jnp.ones((plan.shape[0],), plan.dtype)
    return _PlanOperator(
        matvec=lambda y: plan @ y,
        rmatvec=lambda z: z @ plan,
        row_cost=jnp.sum(weighted, axis=1),
        col_cost=ones_n @ weighted,
        row_mass=jnp.sum(plan, axis=1),
        col_mass=ones_n @ plan,
    )


def _pcg(matvec, rhs: jax.Array, precond: jax.Array, tol: float, max_iterations: int):
    """Preconditioned conjugate gradients for a PSD system; returns (solution, iterations).

    Stops at ``||r|| <= tol ||rhs||``, at ``max_iterations``, or on breakdown: the system is
    singular (null direction 1), and in float32 ``p^T A p`` can round to <= 0 near convergence,
    where a plain CG step would divide by ~0 and return NaN. On breakdown the last iterate is kept.
    ``iterations == max_iterations`` means the cap was hit.
    """
    tiny = jnp.finfo(rhs.dtype).tiny
    stop = (tol * jnp.linalg.norm(rhs)) ** 2
    z0 = precond * rhs

    def cond(state):
        _, r, _, _, k, broken = state
        return (jnp.vdot(r, r) > stop) & (k < max_iterations) & ~broken

    def body(state):
        x, r, p, rz, k, _ = state
        ap = matvec(p)
        pap = jnp.vdot(p, ap)
        ok = (pap > tiny) & jnp.isfinite(pap) & (rz > 0)
        alpha = jnp.where(ok, rz / jnp.where(ok, pap, 1.0), 0.0)
        x_new = x + alpha * p
        r_new = r - alpha * ap
        z = precond * r_new
        rz_new = jnp.vdot(r_new, z)
        ok = ok & jnp.all(jnp.isfinite(x_new)) & jnp.isfinite(rz_new)
        beta = jnp.where(ok, rz_new / jnp.where(ok, rz, 1.0), 0.0)
        return (jnp.where(ok, x_new, x), jnp.where(ok, r_new, r), z + beta * p, rz_new, k + ok, ~ok)

    init = (jnp.zeros_like(rhs), rhs, z0, jnp.vdot(rhs, z0), jnp.asarray(0), jnp.asarray(False))
    x, _, _, _, k, _ = jax.lax.while_loop(cond, body, init)
    return x, k


def _transport_cost_gradient(
    out: SinkhornSolve, settings: SinkhornSettings
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Value ``<T, C>``, its implicit gradient in the row marginal (module docstring), the CG
    iterations (0 for the direct solve) and whether the adjoint solve stayed below its cap."""
    n, m = out.geom.shape
    direct = n * m * m <= DIRECT_ADJOINT_MAX_FLOPS
    op = _plan_operator(out, materialize=direct)
    tiny = jnp.finfo(op.row_mass.dtype).tiny
    r = jnp.maximum(op.row_mass, tiny)
    c = op.col_mass
    c_r, c_c = op.row_cost, op.col_cost
    rhs = c_c - op.rmatvec(c_r / r)
    if direct:
        plan = _plan_matrix(out)
        y = _pinv_schur_solve((plan.T / r) @ plan, c, rhs)
        iterations = jnp.asarray(0)
    else:
        def matvec(v):
            return c * v - op.rmatvec(op.matvec(v) / r)

        precond = 1.0 / jnp.maximum(c, tiny)
        y, iterations = _pcg(matvec, rhs, precond, settings.adjoint_tol, settings.adjoint_max_iterations)
    x = (c_r - op.matvec(y)) / r
    return jnp.sum(c_r), x, iterations, iterations < settings.adjoint_max_iterations


def transport_loss(geom, a, b, init: Potentials, settings: SinkhornSettings) -> LossOutput:
    r""":math:`\langle T^\star, C\rangle` of the entropic plan and its implicit gradient in ``a``
    (a :class:`~sotjax.streaming.BlockGeometry` -- streamed cost or stored bfloat16 kernel -- is solved
    in row blocks)."""
    if isinstance(geom, streaming.BlockGeometry):
        return streaming.streamed_transport_loss(geom, a, b, init, settings)
    out, pots = solve_sinkhorn(geom, a, b, init, settings)
    value, grad, adjoint_iters, adjoint_ok = _transport_cost_gradient(out, settings)
    return LossOutput(value, grad, pots, out.n_iters, out.converged, adjoint_iters, adjoint_ok, out.error)


def regularized_loss(geom, a, b, init: Potentials, settings: SinkhornSettings) -> LossOutput:
    r""":math:`\mathrm{OT}_\varepsilon(a, b)` with gradient :math:`\tilde f` (envelope theorem)."""
    if isinstance(geom, streaming.BlockGeometry):
        return streaming.streamed_regularized_loss(geom, a, b, init, settings)
    out, pots = solve_sinkhorn(geom, a, b, init, settings)
    return LossOutput(out.reg_ot_cost, pots.f, pots, out.n_iters, out.converged, jnp.asarray(0),
                      jnp.asarray(True), out.error)


def self_transport(geom_xx, a, init: jax.Array, settings: SinkhornSettings):
    r"""Symmetric :math:`\mathrm{OT}_\varepsilon(a, a)`; returns (value, centred potential, solve)."""
    out, pots = solve_sinkhorn(geom_xx, a, a, Potentials(init, init), settings, symmetric=True)
    return out.reg_ot_cost, 0.5 * (pots.f + pots.g), out
