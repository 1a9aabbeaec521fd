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
      \bigl(\mathrm{diag}(c) - T^\top \mathrm{diag}(r)^{-1} T\bigr)\, y = c_c - T^\top (c_r / r),
      \qquad x = (c_r - T y)/r,

  solved directly when ``n m^2`` is small (the safe anchor) and by Jacobi-preconditioned conjugate
  gradients otherwise. The system is singular along :math:`\mathbf 1` (shifting
  :math:`\alpha \to \alpha + t`, :math:`\beta \to \beta - t` leaves ``T`` unchanged) and the right-hand
  side is orthogonal to it, so CG from zero stays in the range. This replaces ott-jax's generic
  implicit differentiation, which on the paper-scale problem took 18.7 s per gradient here (see
  ``benchmarks/RESULTS.md``), with the plan materialised once per step.
* the Sinkhorn divergence :math:`S_\varepsilon(a,b) = \mathrm{OT}_\varepsilon(a,b) -
  \tfrac12\mathrm{OT}_\varepsilon(a,a) - \tfrac12\mathrm{OT}_\varepsilon(b,b)` is assembled in
  :mod:`sotjax.objective` from :func:`regularized_loss` and :func:`self_transport`: gradient
  :math:`\tilde f_{ab} - \tilde p_{aa}`, with :math:`\tilde p_{aa}` the symmetric centred potential
  of the corpus self-transport (:math:`\nabla_a \tfrac12\mathrm{OT}_\varepsilon(a,a) = \tilde p_{aa}`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import acceleration, sinkhorn

# Reference sides up to this many flops (n * m^2) get a dense direct adjoint solve.
DIRECT_ADJOINT_MAX_FLOPS = 2e8


@dataclasses.dataclass(frozen=True)
class SinkhornSettings:
    """Inner-solver settings (hashable: passed as a static argument to jitted code)."""

    threshold: float = 1e-4
    max_iterations: int = 2000
    adjoint_tol: float = 1e-5
    adjoint_max_iterations: int = 500


class Potentials(NamedTuple):
    """Centred dual potentials ``(f~, g~)``: the warm start carried between solves."""

    f: jax.Array
    g: jax.Array


class LossOutput(NamedTuple):
    """One loss evaluation: value, gradient in ``a`` and solver diagnostics."""

    value: jax.Array
    grad_a: jax.Array
    potentials: Potentials
    sinkhorn_iterations: jax.Array
    sinkhorn_converged: jax.Array
    adjoint_iterations: jax.Array


def zero_potentials(n: int, m: int, dtype: jnp.dtype) -> Potentials:
    return Potentials(jnp.zeros((n,), dtype), jnp.zeros((m,), dtype))


def _uses_kernel(geom: geometry.Geometry) -> bool:
    # ott stores a user-provided kernel in ``_kernel_matrix``; cosine_geometry provides one
    # exactly when kernel mode was chosen.
    return geom._kernel_matrix is not None  # noqa: SLF001 - reading our own construction


def _safe_log(x: jax.Array) -> jax.Array:
    return jnp.log(jnp.maximum(x, jnp.finfo(x.dtype).tiny))


def solve_sinkhorn(
    geom: geometry.Geometry,
    a: jax.Array,
    b: jax.Array,
    init: Potentials,
    settings: SinkhornSettings,
    symmetric: bool = False,
) -> tuple[sinkhorn.SinkhornOutput, Potentials]:
    r"""Balanced entropic OT with ott-jax, warm-started from centred potentials.

    The warm start is :math:`f = \tilde f + \varepsilon \log a` (log mode) or
    :math:`u = e^{f/\varepsilon}` (kernel mode). No autodiff goes through the solver: the
    gradients are formed explicitly (module docstring), so ``implicit_diff`` is off.
    ``symmetric=True`` (for :math:`\mathrm{OT}_\varepsilon(a, a)`) uses the averaged parallel
    updates of Feydy et al. (2019, Eq. 25) -- what ott-jax's Sinkhorn divergence uses for its
    symmetric terms; alternating updates oscillate there (16k iterations instead of ~10 at 1e-13).
    """
    eps = geom.epsilon
    kernel = _uses_kernel(geom)
    f0 = init.f + eps * _safe_log(a)
    g0 = init.g + eps * _safe_log(b)
    start = (jnp.exp(f0 / eps), jnp.exp(g0 / eps)) if kernel else (f0, g0)
    solver = sinkhorn.Sinkhorn(
        lse_mode=not kernel,
        threshold=settings.threshold,
        max_iterations=settings.max_iterations,
        inner_iterations=1,
        implicit_diff=None,
        **(dict(parallel_dual_updates=True, momentum=acceleration.Momentum(start=0, value=0.5))
           if symmetric else {}),
    )
    out = solver(linear_problem.LinearProblem(geom, a, b), init=start)
    centred = Potentials(out.f - eps * _safe_log(a), out.g - eps * _safe_log(b))
    return out, centred


class _PlanOperator(NamedTuple):
    r"""Products with the plan :math:`T` and its marginal/cost sums, without forming ``T``.

    Kernel mode: :math:`T = \mathrm{diag}(u) K \mathrm{diag}(v)`, and :math:`T\odot C` uses the
    precomputed :math:`K \odot C` of :class:`~sotjax.geometry.KernelGeometry`: every quantity is a
    matrix-vector product. Log mode materialises ``T`` once.
    """

    matvec: object  # y -> T y
    rmatvec: object  # z -> T^T z (computed as z @ T)
    row_cost: jax.Array  # (T * C) 1
    col_cost: jax.Array  # (T * C)^T 1
    row_mass: jax.Array  # T 1
    col_mass: jax.Array  # T^T 1


def _plan_matrix(out: sinkhorn.SinkhornOutput) -> jax.Array:
    geom = out.geom
    if _uses_kernel(geom):
        return geom.transport_from_scalings(*out.scalings)
    return geom.transport_from_potentials(out.f, out.g)


def _plan_operator(out: sinkhorn.SinkhornOutput, materialize: bool) -> _PlanOperator:
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
    weighted = plan * geom.cost_matrix
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
    out: sinkhorn.SinkhornOutput, settings: SinkhornSettings
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Value ``<T, C>`` and its implicit gradient in the row marginal (module docstring)."""
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
        schur = jnp.diag(c) - (plan.T / r) @ plan
        # Pin the null direction 1: (S + s 11^T) y = rhs has the solution with 1^T y = 0.
        y = jnp.linalg.solve(schur + jnp.mean(c), rhs)
        iterations = jnp.asarray(0)
    else:
        matvec = lambda v: c * v - op.rmatvec(op.matvec(v) / r)
        precond = 1.0 / jnp.maximum(c, tiny)
        y, iterations = _pcg(matvec, rhs, precond, settings.adjoint_tol, settings.adjoint_max_iterations)
    x = (c_r - op.matvec(y)) / r
    return jnp.sum(c_r), x, iterations


def transport_loss(geom, a, b, init: Potentials, settings: SinkhornSettings) -> LossOutput:
    r""":math:`\langle T^\star, C\rangle` of the entropic plan and its implicit gradient in ``a``."""
    out, pots = solve_sinkhorn(geom, a, b, init, settings)
    value, grad, adjoint_iters = _transport_cost_gradient(out, settings)
    return LossOutput(value, grad, pots, out.n_iters, out.converged, adjoint_iters)


def regularized_loss(geom, a, b, init: Potentials, settings: SinkhornSettings) -> LossOutput:
    r""":math:`\mathrm{OT}_\varepsilon(a, b)` with gradient :math:`\tilde f` (envelope theorem)."""
    out, pots = solve_sinkhorn(geom, a, b, init, settings)
    return LossOutput(out.reg_ot_cost, pots.f, pots, out.n_iters, out.converged, jnp.asarray(0))


def self_transport(geom_xx, a, init: jax.Array, settings: SinkhornSettings):
    r"""Symmetric :math:`\mathrm{OT}_\varepsilon(a, a)`; returns (value, centred potential, output)."""
    out, pots = solve_sinkhorn(geom_xx, a, a, Potentials(init, init), settings, symmetric=True)
    return out.reg_ot_cost, 0.5 * (pots.f + pots.g), out
