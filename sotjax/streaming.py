r"""Entropic OT in row blocks: one Sinkhorn, plan and adjoint code path for two block geometries,
never an ``n x m`` matrix in float32.

A *block geometry* (:class:`BlockGeometry`) stores the corpus side in row blocks ``(n_blocks, B, ...)``
(zero-padded to a multiple of ``B``; padding rows have marginal 0, :math:`\log a = -\infty`, so they
carry no mass anywhere) and says how one block enters the updates (:meth:`BlockGeometry.block`):

* :class:`StreamedCosine` (the ``stream`` plan) stores the unit rows :math:`\hat x_i` and recomputes
  the cost :math:`C_{ij} = 1 - \hat x_i^\top \hat y_j` (clipped to ``[0, 2]``) of a block whenever it is
  needed: one ``(B, d) x (d, m)`` matrix product, memory :math:`O((n + m)d + Bm)` whatever ``n``, any
  :math:`\varepsilon` (log-sum-exp updates).
* :class:`StoredKernel` (the ``dense-bf16`` plan) stores the Gibbs kernel :math:`K = e^{-C/\varepsilon}`
  itself, in bfloat16 (2 bytes an entry, half of one float32 matrix; the dense plan keeps three). A block
  is upcast to the compute dtype inside the scan (never a whole float32 copy) and enters by two
  matrix-vector products: no cost product, no ``exp`` per entry; an iteration reads 2 bytes per pair
  from memory once (the block's second product hits the cache), where dense reads its float32 kernel
  twice. Measured on a 2-core CPU (``benchmarks/RESULTS.md``, m = 5000, d = 384): 12 ms per iteration
  at n = 10^4 against 30 ms dense and 547 ms streamed, 1.18 s at n = 10^6 against ~23 s streamed.
  Why the kernel and not the cost in bfloat16: rounding to bfloat16 (8 significant bits, round to
  nearest) is a *relative* error of at most :math:`u = 2^{-8}` per entry. On :math:`K` that is
  :math:`K_{ij}(1 + \delta_{ij})`, i.e. the exact kernel of the cost
  :math:`\tilde C = C - \varepsilon\log(1 + \delta)`, :math:`|\tilde C - C| \le \varepsilon u` (measured:
  up to :math:`0.998\,\varepsilon u`): an error of at most ``u`` = 0.004 in every exponent
  :math:`C/\varepsilon`, whatever :math:`\varepsilon`. On :math:`C` it is an absolute error up to
  :math:`2^{-8}` (``C`` in ``[1, 2)``), i.e. up to :math:`2^{-8}/\varepsilon`
  = 0.04 in the exponent at :math:`\varepsilon = 0.1`: 10x more, growing as :math:`1/\varepsilon`. The
  solve is then the exact entropic problem of :math:`\tilde C` (the transport loss uses
  :math:`\tilde C = -\varepsilon \log K` of the stored block, so its value and its implicit gradient
  are consistent), and :math:`|\mathrm{OT}_\varepsilon(\tilde C) - \mathrm{OT}_\varepsilon(C)| \le
  \varepsilon u` (a minimum of functions each 1-Lipschitz in the cost's sup norm). Its effect on the
  weights is measured in ``tests/test_bf16.py`` and ``benchmarks/RESULTS.md``. Storing the kernel
  needs :math:`\max C/\varepsilon \le` ``MAX_KERNEL_EXPONENT["float32"]`` (30, :math:`K \ge 10^{-13}`;
  bfloat16 has float32's exponent range), checked when it is built.

Potentials are *centred* (as in :mod:`sotjax.transport`): the plan is
:math:`T_{ij} = a_i b_j \exp((f_i + g_j - C_{ij})/\varepsilon)`, and the alternating log-domain
Sinkhorn updates are

.. math::
    f_i \leftarrow -\varepsilon \log \sum_j b_j e^{(g_j - C_{ij})/\varepsilon}, \qquad
    g_j \leftarrow -\varepsilon \log \sum_i a_i e^{(f_i - C_{ij})/\varepsilon}.

**One pass per iteration.** A block's ``f`` update needs only that block's rows, and the ``g``
update is a sum over rows: one scan over the blocks updates the block's ``f`` and adds the block's
terms to a running (online) log-sum-exp over rows for every column (:class:`OnlineLSE`), so each
iteration reads the corpus side once. The column marginal *before* the ``g`` update,
:math:`T^\top 1 = b \odot e^{(g^{\rm old} - g^{\rm new})/\varepsilon}`, comes for free, and its L1 error
to ``b`` is the stopping criterion (ott-jax's, in the same pass). With a stored kernel both updates are
matrix-vector products with shifts (the potentials stay in the log domain):
:math:`f_i = -\varepsilon\,(t + \log \sum_j K_{ij} v_j)` with :math:`h_j = g_j/\varepsilon + \log b_j`,
:math:`t = \max_j h_j`, :math:`v = e^{h - t} \in (0, 1]`, and per block :math:`s = \max_{i} (f_i/\varepsilon +
\log a_i)` (a scalar), :math:`u = e^{f/\varepsilon + \log a - s}`, the block adding
:math:`(s, u^\top K)` to the running column log-sum-exp. Since :math:`K \ge e^{-30}` and one
:math:`v_j = 1`, every row sum is at least :math:`e^{-30}` and every column sum of a block at least
:math:`e^{-30}`: nothing under- or overflows.

**The transport loss's adjoint** (:mod:`sotjax.transport`) needs the plan's marginals and cost sums
(one pass) and the Schur-complement operator
:math:`y \mapsto c \odot y - T^\top \mathrm{diag}(r)^{-1} T y`: ``T y`` is row-local, so a block
computes its rows of ``T y``, divides by ``r`` and adds its share of :math:`T^\top(\cdot)`: one pass
per conjugate-gradient iteration, again without ``T``. A block's plan is a :class:`BlockPlan`
:math:`\mathrm{diag}(\rho) M \mathrm{diag}(\gamma)`: the streamed block forms ``M = T`` (one ``exp`` per
entry), the stored kernel keeps ``M = K`` with :math:`\rho_i = e^{f_i/\varepsilon + \log a_i + t} \le
e^{30}` (its row of ``T`` sums to :math:`a_i \le 1` and contains :math:`\rho_i K_{ij^\star}`) and
:math:`\gamma = v`.

**Sharding.** With a :class:`jax.sharding.Mesh` (axis ``"data"``) the row blocks are split over the
devices (``n_blocks`` a multiple of the device count): every function below runs per device inside
:func:`jax.shard_map` on its own blocks, and the only cross-device traffic is the length-``m``
column accumulators (running log-sum-exp maxima and sums: ``pmax``/``psum``; plan products:
``psum``) and a few scalars. Row quantities (``f``, gradients) never leave their device. The
conjugate-gradient iterates live on the reference side (length ``m``) and are replicated.

The cost product runs at ``Precision.HIGHEST`` (no TF32/bf16 passes on accelerators: Sinkhorn in
float32 stops converging with a TF32 cost, ott-jax issue 496). That holds for the stored kernel too:
its cost is computed in full precision, and only the result is rounded, once, to bfloat16.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sotjax.geometry import MAX_KERNEL_EXPONENT

#: the mesh axis the corpus rows are split over
AXIS = "data"
#: storage dtype of :class:`StoredKernel`: bfloat16, held as its bit pattern (:func:`bf16_bits_to`)
KERNEL_DTYPE = jnp.bfloat16
KERNEL_BITS = jnp.uint16
#: the stored kernel's largest exponent max C/epsilon: float32's kernel-mode limit (bfloat16 has its range)
KERNEL_EXPONENT_LIMIT = MAX_KERNEL_EXPONENT["float32"]


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

    def add_scaled(self, top: jax.Array, sums: jax.Array) -> OnlineLSE:
        """Fold in a block already reduced over its rows: column log-sums ``top + log(sums)`` with a
        scalar ``top`` (``-inf``: a block of padding only, nothing to add)."""
        new_max = jnp.maximum(self.max, top)
        shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        scaled = jnp.where(jnp.isfinite(self.max), self.sum * jnp.exp(self.max - shift), 0.0)
        added = jnp.where(jnp.isfinite(top), sums * jnp.exp(top - shift), 0.0)
        return OnlineLSE(new_max, scaled + added)

    def combine(self, geom: BlockGeometry) -> OnlineLSE:
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


def bf16_bits_to(bits: jax.Array, dtype) -> jax.Array:
    """bfloat16 numbers stored as their ``uint16`` bit patterns, in ``dtype`` (exact: a bfloat16 is the
    top half of a float32).

    Why bits and not a bfloat16 array: XLA:CPU converted a scanned bfloat16 array to float32 as a whole,
    *before* the Sinkhorn loop (measured: a full float32 copy, 6 bytes per kernel entry in all, an
    optimisation barrier in the loop body did not stop it); integer bits are not converted, and this
    upcast of one block stays inside the loop body."""
    wide = jax.lax.bitcast_convert_type(bits.astype(jnp.uint32) << 16, jnp.float32)
    return wide.astype(dtype)


def _scaled(x: jax.Array, scale: jax.Array | None) -> jax.Array:
    return x if scale is None else x * scale


class BlockPlan(NamedTuple):
    r"""One block's rows of the plan, :math:`T_b = \mathrm{diag}(\rho)\, M\, \mathrm{diag}(\gamma)`
    (``None``: no scaling), with its products; ``M`` is ``(B, m)``."""

    matrix: jax.Array
    row: jax.Array | None = None  # (B,)
    col: jax.Array | None = None  # (m,)

    def matvec(self, v: jax.Array) -> jax.Array:
        """:math:`T_b v`, ``(B,)``."""
        return _scaled(self.matrix @ _scaled(v, self.col), self.row)

    def rmatvec(self, z: jax.Array) -> jax.Array:
        r""":math:`T_b^\top z` for ``z`` of length ``B``, ``(m,)``."""
        return _scaled(_scaled(z, self.row) @ self.matrix, self.col)

    def sums(self, cost: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        r""":math:`T_b 1`, :math:`T_b^\top 1`, :math:`(T_b \odot C_b) 1`, :math:`(T_b \odot C_b)^\top 1`."""
        weighted = self.matrix * cost
        if self.col is None:
            row_mass, row_cost = self.matrix.sum(1), weighted.sum(1)
        else:
            row_mass, row_cost = self.matrix @ self.col, weighted @ self.col
        if self.row is None:
            col_mass, col_cost = jnp.sum(self.matrix, axis=0), jnp.sum(weighted, axis=0)
        else:
            col_mass, col_cost = self.row @ self.matrix, self.row @ weighted
        return (_scaled(row_mass, self.row), _scaled(col_mass, self.col), _scaled(row_cost, self.row),
                _scaled(col_cost, self.col))


class CostBlock(NamedTuple):
    """One block of :class:`StreamedCosine`: its cost ``(B, m)``, just recomputed; log-sum-exp updates."""

    cost: jax.Array
    eps: jax.Array

    def row_potential(self, cols: tuple[jax.Array, jax.Array]) -> jax.Array:
        """The block's ``f`` update from the columns' ``(g, log b)``."""
        g, log_b = cols
        return -self.eps * jax.nn.logsumexp((g[None, :] - self.cost) / self.eps + log_b[None, :], axis=1)

    def fold_columns(self, acc: OnlineLSE, f_b: jax.Array, log_a: jax.Array) -> OnlineLSE:
        """Add the block's rows to the running column log-sum-exp of the ``g`` update."""
        return acc.add((f_b[:, None] - self.cost) / self.eps + log_a[:, None])

    def plan(self, f_b: jax.Array, log_a: jax.Array, cols: tuple[jax.Array, jax.Array]) -> BlockPlan:
        g, log_b = cols
        logt = (f_b[:, None] + g[None, :] - self.cost) / self.eps + log_a[:, None] + log_b[None, :]
        return BlockPlan(jnp.exp(logt))

    def block_cost(self) -> jax.Array:
        return self.cost


class KernelBlock(NamedTuple):
    """One block of :class:`StoredKernel`: its kernel ``(B, m)`` upcast to the compute dtype; the
    updates are matrix-vector products with shifts (module docstring)."""

    kernel: jax.Array
    eps: jax.Array

    def row_potential(self, cols: tuple[jax.Array, jax.Array]) -> jax.Array:
        """``f`` from the columns' ``(v, t)``: :math:`-\\varepsilon (t + \\log K v)`."""
        v, t = cols
        return -self.eps * (t + jnp.log(self.kernel @ v))

    def fold_columns(self, acc: OnlineLSE, f_b: jax.Array, log_a: jax.Array) -> OnlineLSE:
        k = f_b / self.eps + log_a
        top = jnp.max(k)
        u = jnp.exp(k - jnp.where(jnp.isfinite(top), top, 0.0))  # 0 on padding rows
        return acc.add_scaled(top, u @ self.kernel)

    def plan(self, f_b: jax.Array, log_a: jax.Array, cols: tuple[jax.Array, jax.Array]) -> BlockPlan:
        v, t = cols
        return BlockPlan(self.kernel, jnp.exp(f_b / self.eps + log_a + t), v)

    def block_cost(self) -> jax.Array:
        r""":math:`\tilde C = -\varepsilon \log K` of the stored (rounded) kernel: the cost whose exact
        entropic problem the solve solves."""
        return -self.eps * jnp.log(self.kernel)


class BlockGeometry:
    """What the blocked Sinkhorn, plan products and adjoint need from a geometry (the protocol of
    :class:`StreamedCosine` and :class:`StoredKernel`).

    A subclass is a frozen dataclass pytree with the leaves ``epsilon`` (traced: changing it recompiles
    nothing) and its row blocks (:attr:`row_data`, ``(n_blocks, B, ...)``, split over the mesh), the
    static ``n`` (real corpus rows) and ``mesh`` (whose ``"data"`` axis splits the blocks; None: one
    device). It says how a block enters the updates (:meth:`block`) and what the column side of an
    iteration precomputes once (:meth:`columns`).

    Inside :func:`jax.shard_map` the same object holds one device's blocks: its column reductions
    (:meth:`psum`, :meth:`pmax`) then combine over the mesh; outside, they are the identity."""

    epsilon: jax.Array
    n: int
    mesh: Mesh | None

    @property
    def row_data(self) -> jax.Array:
        """The stored row blocks ``(n_blocks, B, ...)`` the scans run over."""
        raise NotImplementedError

    @property
    def ref_rows(self) -> int:
        raise NotImplementedError

    def specs(self) -> Any:
        """The :class:`PartitionSpec` pytree of this geometry: blocks split, the rest replicated."""
        raise NotImplementedError

    def columns(self, g: jax.Array, log_b: jax.Array, eps: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The column side of the ``f`` update and of the plan, once per pass."""
        raise NotImplementedError

    def block(self, data: jax.Array, eps: jax.Array) -> CostBlock | KernelBlock:
        """One stored block in the form the updates use."""
        raise NotImplementedError

    def psum(self, x: jax.Array) -> jax.Array:
        """Sum over the devices of the mesh (identity on one device)."""
        return x if self.mesh is None else jax.lax.psum(x, AXIS)

    def pmax(self, x: jax.Array) -> jax.Array:
        """Maximum over the devices of the mesh (identity on one device)."""
        return x if self.mesh is None else jax.lax.pmax(x, AXIS)

    @property
    def block_rows(self) -> int:
        return int(self.row_data.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.ref_rows

    def blocks(self, v: jax.Array, fill: float = 0.0) -> jax.Array:
        """A length-``n`` vector as ``(n_blocks, B)``, padded with ``fill``."""
        nb, b = self.row_data.shape[:2]
        return jnp.pad(v, (0, nb * b - self.n), constant_values=fill).reshape(nb, b)

    def unblock(self, v: jax.Array) -> jax.Array:
        """Inverse of :meth:`blocks`: the first ``n`` entries."""
        return v.reshape(-1)[: self.n]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["x_blocks", "y", "epsilon"],
                   meta_fields=["n", "mesh"])
@dataclasses.dataclass(frozen=True)
class StreamedCosine(BlockGeometry):
    """Corpus rows in blocks ``(n_blocks, B, d)`` (zero-padded to a multiple of ``B``) and the
    reference rows ``(m, d)``, all unit-normalised; the cost of a block is recomputed (one matrix
    product) whenever it is needed (the ``stream`` plan)."""

    x_blocks: jax.Array
    y: jax.Array
    epsilon: jax.Array
    n: int
    mesh: Mesh | None = None

    @property
    def row_data(self) -> jax.Array:
        return self.x_blocks

    @property
    def ref_rows(self) -> int:
        return int(self.y.shape[0])

    def specs(self) -> StreamedCosine:
        return dataclasses.replace(self, x_blocks=P(AXIS), y=P(), epsilon=P())  # type: ignore[arg-type]

    def cost_block(self, xb: jax.Array) -> jax.Array:
        """:math:`C` for one block of rows, ``(B, m)``."""
        dots = jnp.matmul(xb, self.y.T, precision=jax.lax.Precision.HIGHEST)
        return jnp.clip(1.0 - dots, 0.0, 2.0)

    def columns(self, g: jax.Array, log_b: jax.Array, eps: jax.Array) -> tuple[jax.Array, jax.Array]:
        return g, log_b

    def block(self, data: jax.Array, eps: jax.Array) -> CostBlock:
        return CostBlock(self.cost_block(data), eps)


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
        _check_sharded_rows(n, b, mesh)
        x_blocks = jax.device_put(x_unit.reshape(nb, b, d), NamedSharding(mesh, P(AXIS)))
        y_unit = jax.device_put(y_unit, NamedSharding(mesh, P()))
    else:
        x_blocks = jnp.pad(x_unit, ((0, nb * b - n), (0, 0))).reshape(nb, b, d)
    return StreamedCosine(x_blocks, y_unit, jnp.asarray(epsilon, x_unit.dtype), n, mesh)


def _check_sharded_rows(n: int, b: int, mesh: Mesh) -> None:
    devices = mesh.devices.size
    if n % b or (n // b) % devices:
        raise ValueError(f"a sharded block geometry needs n = {n} to be a multiple of {b} x {devices}")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k_blocks", "epsilon"],
                   meta_fields=["n", "m", "mesh"])
@dataclasses.dataclass(frozen=True)
class StoredKernel(BlockGeometry):
    r"""The Gibbs kernel :math:`K = e^{-C/\varepsilon}` in row blocks ``(n_blocks, B, m)``, stored in
    bfloat16 (as ``uint16`` bit patterns, :func:`bf16_bits_to`; the ``dense-bf16`` plan, module
    docstring); each block is upcast to the dtype of ``epsilon`` (the compute dtype) when it is used.
    Build it with :func:`stored_kernel`. The kernel fixes the problem: solved at another ``epsilon``, the
    cost is :math:`-\varepsilon \log K`."""

    k_blocks: jax.Array
    epsilon: jax.Array
    n: int
    m: int
    mesh: Mesh | None = None

    @property
    def row_data(self) -> jax.Array:
        return self.k_blocks

    @property
    def ref_rows(self) -> int:
        return self.m

    def specs(self) -> StoredKernel:
        return dataclasses.replace(self, k_blocks=P(AXIS), epsilon=P())  # type: ignore[arg-type]

    def columns(self, g: jax.Array, log_b: jax.Array, eps: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = g / eps + log_b
        top = jnp.max(h)
        t = jnp.where(jnp.isfinite(top), top, 0.0)
        return jnp.exp(h - t), t

    def block(self, data: jax.Array, eps: jax.Array) -> KernelBlock:
        return KernelBlock(bf16_bits_to(data, self.epsilon.dtype), eps)


def stored_kernel(x_unit: jax.Array, y_unit: jax.Array, block_rows: int, epsilon: float,
                  mesh: Mesh | None = None, rows: int | None = None) -> tuple[StoredKernel, float]:
    r"""The bfloat16 kernel of the cosine cost between ``x_unit`` (``(n, d)`` unit rows, the corpus) and
    ``y_unit`` (``(m, d)``), in ``block_rows``-row blocks, and the largest cost of the real rows.

    Computed a block at a time (the cost in the compute dtype at full precision, then
    :math:`e^{-C/\varepsilon}` rounded once to bfloat16), so the peak is the stored kernel plus one
    block. ``rows``: the first ``rows`` rows are real, the rest zero-mass padding (left out of the
    largest cost). With a ``mesh`` the blocks are computed where they are stored (each device its own
    rows); ``n`` must then be a multiple of ``block_rows`` times the device count, as for
    :func:`streamed_cosine`.

    Raises :class:`~sotjax.errors.SotjaxInputError` when :math:`\max C/\varepsilon` exceeds
    :data:`KERNEL_EXPONENT_LIMIT` (the kernel would lose its range and precision).
    """
    n, _ = x_unit.shape
    b = max(1, min(int(block_rows), n))
    real = np.asarray(n if rows is None else rows, np.int32)
    eps = np.asarray(epsilon, x_unit.dtype)
    if mesh is not None:
        _check_sharded_rows(n, b, mesh)

        def local(x, y, e, r):
            first = jax.lax.axis_index(AXIS) * x.shape[0]
            k, top = _kernel_blocks(x, y, e, r, first, b)
            return k, jax.lax.pmax(top, AXIS)

        build = jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS), P(), P(), P()), out_specs=(P(AXIS), P()),
                              check_vma=False)
        y_unit = jax.device_put(y_unit, NamedSharding(mesh, P()))
        k_blocks, top = jax.jit(build)(x_unit, y_unit, eps, real)
    else:
        k_blocks, top = _kernel_blocks_jit(x_unit, y_unit, eps, real, 0, b)
    cost_max = float(top)
    if cost_max / float(epsilon) > KERNEL_EXPONENT_LIMIT:
        from sotjax.errors import SotjaxInputError  # noqa: PLC0415

        raise SotjaxInputError(
            f"--plan dense-bf16: max C/epsilon = {cost_max / float(epsilon):.3g} > {KERNEL_EXPONENT_LIMIT:g} at"
            f" --epsilon {float(epsilon):g}: the bfloat16 kernel exp(-C/epsilon) would leave its range; use a"
            f" larger --epsilon or --plan stream")
    return StoredKernel(k_blocks, jnp.asarray(epsilon, x_unit.dtype), n, int(y_unit.shape[0]), mesh), cost_max


def _kernel_blocks(x: jax.Array, y: jax.Array, eps: jax.Array, rows: jax.Array, first: jax.Array | int,
                   b: int) -> tuple[jax.Array, jax.Array]:
    """``(K (n_blocks, b, m) bfloat16 bits, max C over the real rows)`` of these rows (padded to blocks)."""
    n, d = x.shape
    nb = -(-n // b)
    x_blocks = jnp.pad(x, ((0, nb * b - n), (0, 0))).reshape(nb, b, d)
    starts = first + b * jnp.arange(nb)

    def one(block):
        xb, start = block
        cost = jnp.clip(1.0 - jnp.matmul(xb, y.T, precision=jax.lax.Precision.HIGHEST), 0.0, 2.0)
        real = (start + jnp.arange(b)) < rows
        kernel = jax.lax.bitcast_convert_type(jnp.exp(-cost / eps).astype(KERNEL_DTYPE), KERNEL_BITS)
        return kernel, jnp.max(jnp.where(real[:, None], cost, 0.0))

    k_blocks, tops = jax.lax.map(one, (x_blocks, starts))
    return k_blocks, jnp.max(tops)


_kernel_blocks_jit = jax.jit(_kernel_blocks, static_argnums=5)


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


def sinkhorn_iteration(geom: BlockGeometry, log_a: jax.Array, log_b: jax.Array, g: jax.Array,
                       epsilon: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One alternating update in one pass: returns ``(f (n_blocks, B), g_new (m,), error)``.

    ``log_a`` is blocked ``(n_blocks, B)`` (``-inf`` on padding); ``error`` is the L1 column-marginal
    error of the plan after the ``f`` update and before the ``g`` update.
    """
    eps = epsilon
    cols = geom.columns(g, log_b, eps)

    def body(acc: OnlineLSE, block):
        data, la = block
        blk = geom.block(data, eps)
        f_b = blk.row_potential(cols)
        return blk.fold_columns(acc, f_b, la), f_b

    acc, f = jax.lax.scan(body, OnlineLSE.empty(g.shape[0], g.dtype), (geom.row_data, log_a))
    g_new = -eps * acc.combine(geom).value()
    b = jnp.exp(log_b)
    error = jnp.sum(jnp.abs(b * jnp.exp((g - g_new) / eps) - b))
    return f, g_new, error


def _sinkhorn_blocks(geom: BlockGeometry, log_a: jax.Array, log_b: jax.Array, epsilon: jax.Array,
                     init_g: jax.Array, threshold: jax.Array, max_iterations: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The solve on (this device's) blocks: ``(f (n_blocks, B), g, iterations, error)``."""
    dtype = init_g.dtype
    f0 = jnp.zeros(geom.row_data.shape[:2], dtype)

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


def sharded(geom: BlockGeometry, fn: Callable[..., Any], in_specs: tuple[Any, ...], out_specs: Any
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


def sinkhorn(geom: BlockGeometry, a: jax.Array, b: jax.Array, epsilon: jax.Array, init_g: jax.Array,
             threshold: jax.Array, max_iterations: int) -> SinkhornResult:
    """Blocked log-domain Sinkhorn from a warm start ``init_g`` (centred), to the L1 threshold."""
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
    """The entropic plan of a blocked solve (any :class:`BlockGeometry`), as products (nothing
    ``n x m`` is stored).

    Row vectors are blocked ``(n_blocks, B)`` (one device's blocks inside :func:`jax.shard_map`);
    column vectors have length ``m``, and every column result is summed over the mesh.
    """

    geom: BlockGeometry
    log_a: jax.Array  # (n_blocks, B)
    log_b: jax.Array  # (m,)
    f: jax.Array  # (n_blocks, B)
    g: jax.Array  # (m,)
    epsilon: jax.Array

    @classmethod
    def from_solve(cls, geom: BlockGeometry, a: jax.Array, b: jax.Array, epsilon: jax.Array,
                   result: SinkhornResult) -> StreamedPlan:
        """The plan of a solve on one device (``a`` and ``result.f`` of length ``n``)."""
        return cls(geom, geom.blocks(_log(a), fill=-jnp.inf), _log(b), geom.blocks(result.f), result.g, epsilon)

    def _scan(self, body, init, *rows: jax.Array):
        """Scan ``body(carry, plan_block, *row_blocks, block)`` over the blocks (``block`` for its cost)."""
        cols = self.geom.columns(self.g, self.log_b, self.epsilon)

        def step(carry, xs):
            data, la, fb, *rest = xs
            blk = self.geom.block(data, self.epsilon)
            return body(carry, blk.plan(fb, la, cols), blk, *rest)

        return jax.lax.scan(step, init, (self.geom.row_data, self.log_a, self.f, *rows))

    def block_sums(self) -> PlanSums:
        """All four marginal/cost sums in one pass (row sums blocked)."""
        m = self.g.shape[0]
        zeros = jnp.zeros((m,), self.g.dtype)

        def body(carry, t, blk):
            col_mass, col_cost = carry
            row_mass, cm, row_cost, cc = t.sums(blk.block_cost())
            return (col_mass + cm, col_cost + cc), (row_mass, row_cost)

        (col_mass, col_cost), (row_mass, row_cost) = self._scan(body, (zeros, zeros))
        return PlanSums(row_mass, self.geom.psum(col_mass), row_cost, self.geom.psum(col_cost))

    def sums(self) -> PlanSums:
        """:meth:`block_sums` with the row sums as length-``n`` vectors (one device)."""
        s = self.block_sums()
        return s._replace(row_mass=self.geom.unblock(s.row_mass), row_cost=self.geom.unblock(s.row_cost))

    def matvec(self, v: jax.Array) -> jax.Array:
        """:math:`T v` for ``v`` of length ``m``; blocked ``(n_blocks, B)`` (rows are local)."""
        _, out = self._scan(lambda _, t, blk: (None, t.matvec(v)), None)
        return out

    def rmatvec(self, z: jax.Array) -> jax.Array:
        r""":math:`T^\top z` for blocked ``z``; returns length ``m``."""
        out, _ = self._scan(lambda acc, t, blk, zblk: (acc + t.rmatvec(zblk), None), jnp.zeros_like(self.g), z)
        return self.geom.psum(out)

    def schur_matvec(self, y: jax.Array, r: jax.Array, c: jax.Array) -> jax.Array:
        r""":math:`c \odot y - T^\top \mathrm{diag}(r)^{-1} T y` in one pass (rows of ``Ty`` are local;
        ``r`` blocked)."""
        def body(acc, t, blk, rblk):
            return acc + t.rmatvec(t.matvec(y) / rblk), None

        tt, _ = self._scan(body, jnp.zeros_like(self.g), r)
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
    r""":math:`\langle T, C\rangle` and its implicit gradient in the row marginal, blocked (one device).

    The same elimination as :func:`sotjax.transport._transport_cost_gradient` (Schur complement
    on the reference side, Jacobi-preconditioned CG), with every product a pass over the blocks:
    one for the sums, one for the right-hand side, one per CG iteration, one for the back-substitution.
    Returns ``(value, grad (n,), cg_iterations)``.
    """
    value, grad, iterations = _transport_blocks(plan, tol, max_iterations)
    return value, plan.geom.unblock(grad), iterations


def _loss_blocks(geom: BlockGeometry, log_a, log_b, g0, threshold, *, settings, transport: bool):
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


def _streamed_loss(geom: BlockGeometry, a, b, init, settings, transport: bool):
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


def streamed_transport_loss(geom: BlockGeometry, a, b, init, settings):
    r""":math:`\langle T^\star, C\rangle` and its implicit gradient in ``a``, streamed
    (the contract of :func:`sotjax.transport.transport_loss`; ``init`` are centred potentials)."""
    return _streamed_loss(geom, a, b, init, settings, transport=True)


def streamed_regularized_loss(geom: BlockGeometry, a, b, init, settings):
    r""":math:`\mathrm{OT}_\varepsilon(a, b)` with gradient the centred potential ``f`` (envelope theorem)."""
    return _streamed_loss(geom, a, b, init, settings, transport=False)
