r"""Streamed cosine-cost entropic OT: Sinkhorn and plan products in row blocks, never an n x m matrix.

For unit rows :math:`\hat x_i` (the corpus, ``n`` of them) and :math:`\hat y_j` (a reference, ``m``),
the cost :math:`C_{ij} = 1 - \hat x_i^\top \hat y_j` (clipped to ``[0, 2]``) of a block of ``B`` rows is
one ``(B, d) x (d, m)`` matrix product, recomputed whenever it is needed: memory is
:math:`O((n + m)d + Bm)` whatever ``n``. The corpus is stored as ``(n_blocks, B, d)`` with zero
padding rows whose marginal is 0 (:math:`\log a = -\infty`), so they carry no mass anywhere.

Potentials are *centred* (as in :mod:`sotjax.transport`): the plan is
:math:`T_{ij} = a_i b_j \exp((f_i + g_j - C_{ij})/\varepsilon)`, and the alternating log-domain
Sinkhorn updates are

.. math::
    f_i \leftarrow -\varepsilon \log \sum_j b_j e^{(g_j - C_{ij})/\varepsilon}, \qquad
    g_j \leftarrow -\varepsilon \log \sum_i a_i e^{(f_i - C_{ij})/\varepsilon}.

**One pass per iteration.** A block's ``f`` update needs only that block's rows, and the ``g``
update is a sum over rows: one scan over the blocks computes the block's cost, updates its ``f``
and adds the block's terms to a running (online) log-sum-exp over rows for every column, so each
iteration costs one matrix product of the corpus with the reference. The column marginal *before*
the ``g`` update, :math:`T^\top 1 = b \odot e^{(g^{\rm old} - g^{\rm new})/\varepsilon}`, comes for
free, and its L1 error to ``b`` is the stopping criterion (ott-jax's, in the same pass).

**The transport loss's adjoint** (:mod:`sotjax.transport`) needs the plan's marginals and cost sums
(one pass) and the Schur-complement operator
:math:`y \mapsto c \odot y - T^\top \mathrm{diag}(r)^{-1} T y`: ``T y`` is row-local, so a block
computes its rows of ``T y``, divides by ``r`` and adds its share of :math:`T^\top(\cdot)`: one pass
per conjugate-gradient iteration, again without ``T``.

**Sharding.** With a :class:`jax.sharding.Mesh` (axis ``"data"``) the row blocks are split over the
devices (``n_blocks`` a multiple of the device count): every function below runs per device inside
:func:`jax.shard_map` on its own blocks, and the only cross-device traffic is the length-``m``
column accumulators (running log-sum-exp maxima and sums: ``pmax``/``psum``; plan products:
``psum``) and a few scalars. Row quantities (``f``, gradients) never leave their device. The
conjugate-gradient iterates live on the reference side (length ``m``) and are replicated.

The cost product runs at ``Precision.HIGHEST`` (no TF32/bf16 passes on accelerators: Sinkhorn in
float32 stops converging with a TF32 cost, ott-jax issue 496).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

#: the mesh axis the corpus rows are split over
AXIS = "data"


@functools.partial(jax.tree_util.register_dataclass, data_fields=["x_blocks", "y", "epsilon"],
                   meta_fields=["n", "mesh"])
@dataclasses.dataclass(frozen=True)
class StreamedCosine:
    """Corpus rows in blocks ``(n_blocks, B, d)`` (zero-padded to a multiple of ``B``) and the
    reference rows ``(m, d)``, all unit-normalised; ``n`` real corpus rows; the entropic ``epsilon``
    (a traced leaf: changing it recompiles nothing); the ``mesh`` whose ``"data"`` axis splits the
    blocks over devices (None: one device).

    Inside :func:`jax.shard_map` the same object holds one device's blocks: its column reductions
    (:meth:`psum`, :meth:`pmax`) then combine over the mesh; outside, they are the identity."""

    x_blocks: jax.Array
    y: jax.Array
    epsilon: jax.Array
    n: int
    mesh: Mesh | None = None

    def psum(self, x: jax.Array) -> jax.Array:
        """Sum over the devices of the mesh (identity on one device)."""
        return x if self.mesh is None else jax.lax.psum(x, AXIS)

    def pmax(self, x: jax.Array) -> jax.Array:
        """Maximum over the devices of the mesh (identity on one device)."""
        return x if self.mesh is None else jax.lax.pmax(x, AXIS)

    def specs(self) -> StreamedCosine:
        """The :class:`PartitionSpec` pytree of this geometry: blocks split, the rest replicated."""
        return dataclasses.replace(self, x_blocks=P(AXIS), y=P(), epsilon=P())  # type: ignore[arg-type]

    @property
    def block_rows(self) -> int:
        return int(self.x_blocks.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, int(self.y.shape[0])

    def blocks(self, v: jax.Array, fill: float = 0.0) -> jax.Array:
        """A length-``n`` vector as ``(n_blocks, B)``, padded with ``fill``."""
        nb, b = self.x_blocks.shape[:2]
        return jnp.pad(v, (0, nb * b - self.n), constant_values=fill).reshape(nb, b)

    def unblock(self, v: jax.Array) -> jax.Array:
        """Inverse of :meth:`blocks`: the first ``n`` entries."""
        return v.reshape(-1)[: self.n]

    def cost_block(self, xb: jax.Array) -> jax.Array:
        """:math:`C` for one block of rows, ``(B, m)``."""
        dots = jnp.matmul(xb, self.y.T, precision=jax.lax.Precision.HIGHEST)
        return jnp.clip(1.0 - dots, 0.0, 2.0)


def streamed_cosine(x_unit: jax.Array, y_unit: jax.Array, block_rows: int, epsilon: float = 0.1,
                    mesh: Mesh | None = None) -> StreamedCosine:
    """Block ``x_unit`` (``(n, d)`` unit rows) into ``block_rows``-row blocks against ``y_unit``.

    With a ``mesh``, ``n`` must be a multiple of ``block_rows`` times the mesh's device count (pad the
    corpus with zero-mass rows first, :func:`sotjax.plan.padded_rows`), so that the blocks split
    evenly and every device's rows are its own contiguous slice of ``x_unit``: a reshape, no copy.
    """
    n, d = x_unit.shape
    b = max(1, min(int(block_rows), n))
    nb = -(-n // b)
    if mesh is not None:
        devices = mesh.devices.size
        if n != nb * b or nb % devices:
            raise ValueError(f"a sharded streamed geometry needs n = {n} to be a multiple of {b} x {devices}")
        from jax.sharding import NamedSharding  # noqa: PLC0415

        x_blocks = jax.device_put(x_unit.reshape(nb, b, d), NamedSharding(mesh, P(AXIS)))
        y_unit = jax.device_put(y_unit, NamedSharding(mesh, P()))
    else:
        x_blocks = jnp.pad(x_unit, ((0, nb * b - n), (0, 0))).reshape(nb, b, d)
    return StreamedCosine(x_blocks, y_unit, jnp.asarray(epsilon, x_unit.dtype), n, mesh)


def _log(x: jax.Array) -> jax.Array:
    """``log`` with ``log 0 = -inf`` (padding rows) and no warning."""
    return jnp.where(x > 0, jnp.log(jnp.where(x > 0, x, 1.0)), -jnp.inf)


class OnlineLSE(NamedTuple):
    """Running column-wise log-sum-exp over row blocks: ``log sum = max + log(sum)``."""

    max: jax.Array
    sum: jax.Array

    @classmethod
    def empty(cls, m: int, dtype) -> OnlineLSE:
        return cls(jnp.full((m,), -jnp.inf, dtype), jnp.zeros((m,), dtype))

    def add(self, h: jax.Array) -> OnlineLSE:
        """Fold in the rows of ``h`` (``(B, m)`` exponents)."""
        new_max = jnp.maximum(self.max, jnp.max(h, axis=0))
        shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        scaled = jnp.where(jnp.isfinite(self.max), self.sum * jnp.exp(self.max - shift), 0.0)
        return OnlineLSE(new_max, scaled + jnp.sum(jnp.exp(h - shift[None, :]), axis=0))

    def combine(self, geom: StreamedCosine) -> OnlineLSE:
        """Merge the devices' running sums: rescale each to the global maximum, then add."""
        if geom.mesh is None:
            return self
        top = geom.pmax(self.max)
        shift = jnp.where(jnp.isfinite(top), top, 0.0)
        scaled = jnp.where(jnp.isfinite(self.max), self.sum * jnp.exp(self.max - shift), 0.0)
        return OnlineLSE(top, geom.psum(scaled))

    def value(self) -> jax.Array:
        shift = jnp.where(jnp.isfinite(self.max), self.max, 0.0)
        return shift + _log(self.sum)


class SinkhornResult(NamedTuple):
    """Centred potentials, iterations run, whether the threshold was reached, the last error."""

    f: jax.Array  # (n,)
    g: jax.Array  # (m,)
    n_iters: jax.Array
    converged: jax.Array
    error: jax.Array

    def reg_ot_cost(self, a: jax.Array, b: jax.Array) -> jax.Array:
        r""":math:`\mathrm{OT}_\varepsilon(a, b) = \langle f, a\rangle + \langle g, b\rangle` (dual value)."""
        return jnp.vdot(self.f, a) + jnp.vdot(self.g, b)


def sinkhorn_iteration(geom: StreamedCosine, log_a: jax.Array, log_b: jax.Array, g: jax.Array,
                       epsilon: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One alternating update in one pass: returns ``(f (n_blocks, B), g_new (m,), error)``.

    ``log_a`` is blocked ``(n_blocks, B)`` (``-inf`` on padding); ``error`` is the L1 column-marginal
    error of the plan after the ``f`` update and before the ``g`` update.
    """
    eps = epsilon

    def body(acc: OnlineLSE, block):
        xb, la = block
        cost = geom.cost_block(xb)
        f_b = -eps * jax.nn.logsumexp((g[None, :] - cost) / eps + log_b[None, :], axis=1)
        acc = acc.add((f_b[:, None] - cost) / eps + la[:, None])
        return acc, f_b

    acc, f = jax.lax.scan(body, OnlineLSE.empty(g.shape[0], g.dtype), (geom.x_blocks, log_a))
    g_new = -eps * acc.combine(geom).value()
    b = jnp.exp(log_b)
    error = jnp.sum(jnp.abs(b * jnp.exp((g - g_new) / eps) - b))
    return f, g_new, error


def _sinkhorn_blocks(geom: StreamedCosine, log_a: jax.Array, log_b: jax.Array, epsilon: jax.Array,
                     init_g: jax.Array, threshold: jax.Array, max_iterations: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The solve on (this device's) blocks: ``(f (n_blocks, B), g, iterations, error)``."""
    dtype = init_g.dtype
    f0 = jnp.zeros(geom.x_blocks.shape[:2], dtype)

    def cond(state):
        _, _, k, err = state
        return (err > threshold) & (k < max_iterations)

    def body(state):
        _, g, k, _ = state
        f, g_new, err = sinkhorn_iteration(geom, log_a, log_b, g, epsilon)
        return f, g_new, k + 1, err

    init = (f0, init_g, jnp.asarray(0), jnp.asarray(jnp.inf, dtype))
    f, g, k, err = jax.lax.while_loop(cond, body, init)
    return f, g, k, err


def sharded(geom: StreamedCosine, fn: Callable[..., Any], in_specs: tuple[Any, ...], out_specs: Any
            ) -> Callable[..., Any]:
    """``fn(geom, *args)`` per device on its blocks (``jax.shard_map``), or as is without a mesh.

    ``in_specs``/``out_specs`` give ``"rows"`` for a blocked ``(n_blocks, B)`` argument/result and
    ``None`` for a replicated one (length-``m`` vectors, scalars).
    """
    if geom.mesh is None:
        return functools.partial(fn, geom)

    def spec(kind):
        return P(AXIS) if kind == "rows" else P()

    per_device = jax.shard_map(fn, mesh=geom.mesh, in_specs=(geom.specs(), *(spec(k) for k in in_specs)),
                               out_specs=tuple(spec(k) for k in out_specs), check_vma=False)
    return functools.partial(per_device, geom)


def sinkhorn(geom: StreamedCosine, a: jax.Array, b: jax.Array, epsilon: jax.Array, init_g: jax.Array,
             threshold: jax.Array, max_iterations: int) -> SinkhornResult:
    """Streamed log-domain Sinkhorn from a warm start ``init_g`` (centred), to the L1 threshold."""
    log_a = geom.blocks(_log(a), fill=-jnp.inf)
    solve = sharded(geom, functools.partial(_sinkhorn_blocks, max_iterations=max_iterations),
                    ("rows", None, None, None, None), ("rows", None, None, None))
    f, g, k, err = solve(log_a, _log(b), jnp.asarray(epsilon, init_g.dtype), init_g,
                         jnp.asarray(threshold, init_g.dtype))
    return SinkhornResult(geom.unblock(f), g, k, err <= threshold, err)


class PlanSums(NamedTuple):
    r"""Marginals and cost sums of the plan: :math:`T1`, :math:`T^\top 1`, :math:`(T\odot C)1`,
    :math:`(T\odot C)^\top 1`."""

    row_mass: jax.Array
    col_mass: jax.Array
    row_cost: jax.Array
    col_cost: jax.Array


class StreamedPlan(NamedTuple):
    """The entropic plan of a streamed solve, as products (nothing ``n x m`` is stored).

    Row vectors are blocked ``(n_blocks, B)`` (one device's blocks inside :func:`jax.shard_map`);
    column vectors have length ``m``, and every column result is summed over the mesh.
    """

    geom: StreamedCosine
    log_a: jax.Array  # (n_blocks, B)
    log_b: jax.Array  # (m,)
    f: jax.Array  # (n_blocks, B)
    g: jax.Array  # (m,)
    epsilon: jax.Array

    @classmethod
    def from_solve(cls, geom: StreamedCosine, a: jax.Array, b: jax.Array, epsilon: jax.Array,
                   result: SinkhornResult) -> StreamedPlan:
        """The plan of a solve on one device (``a`` and ``result.f`` of length ``n``)."""
        return cls(geom, geom.blocks(_log(a), fill=-jnp.inf), _log(b), geom.blocks(result.f), result.g, epsilon)

    def _block_plan(self, xb, la, fb):
        cost = self.geom.cost_block(xb)
        logt = (fb[:, None] + self.g[None, :] - cost) / self.epsilon + la[:, None] + self.log_b[None, :]
        return jnp.exp(logt), cost

    def block_sums(self) -> PlanSums:
        """All four marginal/cost sums in one pass (row sums blocked)."""
        m = self.g.shape[0]
        zeros = jnp.zeros((m,), self.g.dtype)

        def body(carry, block):
            col_mass, col_cost = carry
            t, cost = self._block_plan(*block)
            tc = t * cost
            return (col_mass + jnp.sum(t, axis=0), col_cost + jnp.sum(tc, axis=0)), (t.sum(1), tc.sum(1))

        (col_mass, col_cost), (row_mass, row_cost) = jax.lax.scan(
            body, (zeros, zeros), (self.geom.x_blocks, self.log_a, self.f))
        return PlanSums(row_mass, self.geom.psum(col_mass), row_cost, self.geom.psum(col_cost))

    def sums(self) -> PlanSums:
        """:meth:`block_sums` with the row sums as length-``n`` vectors (one device)."""
        s = self.block_sums()
        return s._replace(row_mass=self.geom.unblock(s.row_mass), row_cost=self.geom.unblock(s.row_cost))

    def matvec(self, v: jax.Array) -> jax.Array:
        """:math:`T v` for ``v`` of length ``m``; blocked ``(n_blocks, B)`` (rows are local)."""
        def body(_, block):
            t, _ = self._block_plan(*block)
            return None, t @ v

        _, out = jax.lax.scan(body, None, (self.geom.x_blocks, self.log_a, self.f))
        return out

    def rmatvec(self, z: jax.Array) -> jax.Array:
        r""":math:`T^\top z` for blocked ``z``; returns length ``m``."""
        def body(acc, block):
            xb, la, fb, zblk = block
            t, _ = self._block_plan(xb, la, fb)
            return acc + zblk @ t, None

        out, _ = jax.lax.scan(body, jnp.zeros_like(self.g), (self.geom.x_blocks, self.log_a, self.f, z))
        return self.geom.psum(out)

    def schur_matvec(self, y: jax.Array, r: jax.Array, c: jax.Array) -> jax.Array:
        r""":math:`c \odot y - T^\top \mathrm{diag}(r)^{-1} T y` in one pass (rows of ``Ty`` are local;
        ``r`` blocked)."""
        def body(acc, block):
            xb, la, fb, rblk = block
            t, _ = self._block_plan(xb, la, fb)
            return acc + ((t @ y) / rblk) @ t, None

        tt, _ = jax.lax.scan(body, jnp.zeros_like(self.g), (self.geom.x_blocks, self.log_a, self.f, r))
        return c * y - self.geom.psum(tt)


def _transport_blocks(plan: StreamedPlan, tol: float, max_iterations: int
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`transport_value_and_grad` on (this device's) blocks: the gradient stays blocked."""
    from sotjax.transport import _pcg  # noqa: PLC0415 - one CG for the dense and streamed adjoints

    sums = plan.block_sums()
    tiny = jnp.finfo(sums.row_mass.dtype).tiny
    # padding rows have no mass (r = 0): any positive r gives them a zero gradient (row_cost = Ty = 0)
    r = jnp.maximum(sums.row_mass, tiny)
    c = sums.col_mass
    rhs = sums.col_cost - plan.rmatvec(sums.row_cost / r)
    precond = 1.0 / jnp.maximum(c, tiny)
    y, iterations = _pcg(lambda v: plan.schur_matvec(v, r, c), rhs, precond, tol, max_iterations)
    grad = (sums.row_cost - plan.matvec(y)) / r
    return plan.geom.psum(jnp.sum(sums.row_cost)), grad, iterations


def transport_value_and_grad(plan: StreamedPlan, tol: float, max_iterations: int
                             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    r""":math:`\langle T, C\rangle` and its implicit gradient in the row marginal, streamed (one device).

    The same elimination as :func:`sotjax.transport._transport_cost_gradient` (Schur complement
    on the reference side, Jacobi-preconditioned CG), with every product a pass over the blocks:
    one for the sums, one for the right-hand side, one per CG iteration, one for the back-substitution.
    Returns ``(value, grad (n,), cg_iterations)``.
    """
    value, grad, iterations = _transport_blocks(plan, tol, max_iterations)
    return value, plan.geom.unblock(grad), iterations


def _loss_blocks(geom: StreamedCosine, log_a, log_b, g0, threshold, *, settings, transport: bool):
    """One loss on (this device's) blocks: solve, then the value and the blocked gradient."""
    eps = geom.epsilon
    f, g, k, err = _sinkhorn_blocks(geom, log_a, log_b, eps, g0, threshold, settings.max_iterations)
    if transport:
        plan = StreamedPlan(geom, log_a, log_b, f, g, eps)
        value, grad, cg = _transport_blocks(plan, settings.adjoint_tol, settings.adjoint_max_iterations)
    else:  # OT_eps = <f, a> + <g, b>, gradient f (padding rows: a = 0)
        a = jnp.exp(log_a)
        value = geom.psum(jnp.sum(jnp.where(a > 0, f * a, 0.0))) + jnp.vdot(g, jnp.exp(log_b))
        grad, cg = f, jnp.asarray(0)
    return value, grad, f, g, k, err, cg


def _streamed_loss(geom: StreamedCosine, a, b, init, settings, transport: bool):
    from sotjax.transport import LossOutput, Potentials  # noqa: PLC0415 - transport imports this module

    dtype = init.g.dtype
    run = sharded(geom, functools.partial(_loss_blocks, settings=settings, transport=transport),
                  ("rows", None, None, None), (None, "rows", "rows", None, None, None, None))
    value, grad, f, g, k, err, cg = run(geom.blocks(_log(a), fill=-jnp.inf), _log(b), init.g,
                                        jnp.asarray(settings.threshold, dtype))
    f = geom.unblock(f)
    adjoint_ok = cg < settings.adjoint_max_iterations if transport else jnp.asarray(True)
    return LossOutput(value, geom.unblock(grad), Potentials(f, g), k, err <= settings.threshold, cg,
                      adjoint_ok, err)


def streamed_transport_loss(geom: StreamedCosine, a, b, init, settings):
    r""":math:`\langle T^\star, C\rangle` and its implicit gradient in ``a``, streamed
    (the contract of :func:`sotjax.transport.transport_loss`; ``init`` are centred potentials)."""
    return _streamed_loss(geom, a, b, init, settings, transport=True)


def streamed_regularized_loss(geom: StreamedCosine, a, b, init, settings):
    r""":math:`\mathrm{OT}_\varepsilon(a, b)` with gradient the centred potential ``f`` (envelope theorem)."""
    return _streamed_loss(geom, a, b, init, settings, transport=False)
