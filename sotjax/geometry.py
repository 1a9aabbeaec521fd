r"""Cosine-cost geometries between unit-normalised point sets (ott-jax ``Geometry``).

For unit vectors :math:`\hat z = z/\|z\|` the cosine distance is

.. math::
    C_{ij} = 1 - \langle \hat x_i, \hat y_j \rangle = \tfrac12 \|\hat x_i - \hat y_j\|^2 \in [0, 2],

so a cosine geometry is a (halved) squared-Euclidean point cloud. The weight-learning loop
solves many Sinkhorn problems on the *same* point sets (only the corpus marginal moves),
so the dense path materialises the cost once, and, in kernel mode, the Gibbs kernel
:math:`K = e^{-C/\varepsilon}` once: every Sinkhorn update is then one matrix-vector product
instead of a log-sum-exp over all pairs. Everything downstream talks to the ott-jax
:class:`~ott.geometry.geometry.Geometry` interface only, so a streamed/sharded geometry can be
swapped in here without touching the objective or the optimiser loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from ott.geometry import geometry

# Kernel mode stores exp(-C/eps); keep max(C)/eps below these so that neither the kernel nor
# the Sinkhorn scalings leave the normal range of the dtype (exp(-30) ~ 1e-13 in float32).
MAX_KERNEL_EXPONENT = {"float32": 30.0, "float64": 300.0}


def normalize_rows(x: jax.Array) -> jax.Array:
    r"""Return :math:`x_i / \|x_i\|_2` row-wise, scale-free: with :math:`s_i = \max_k |x_{ik}|`,

    .. math::
        \hat x_i = \frac{x_i / s_i}{\|x_i / s_i\|_2},

    where :math:`x_i/s_i` has entries in :math:`[-1, 1]` and norm in :math:`[1, \sqrt d]`, so neither the
    squared norm overflows (rows of size 1e20 in float32) nor underflows to 0 (rows of size 1e-20).
    All-zero rows stay zero (they are refused at the I/O edge). On the device :math:`s_i` is replaced by
    its power of two :math:`2^{e_i}` (:math:`s_i = m\,2^{e_i}`, :math:`m \in [\tfrac12, 1)`; norm then in
    :math:`[\tfrac12, \sqrt d]`), applied with ``frexp``/``ldexp``, which is exact: XLA on CPU computes
    ``x / s`` as ``x * (1/s)`` and flushes subnormal numbers to zero, so ``1/s`` for
    :math:`s = 3\cdot 10^{38}` would be 0. For the same reason rows whose entries are all subnormal must
    be normalised before they reach the device: :func:`unit_rows` does that in NumPy.
    """
    _, exponent = jnp.frexp(jnp.max(jnp.abs(x), axis=-1, keepdims=True))
    y = jnp.ldexp(x, -exponent)
    norm = jnp.linalg.norm(y, axis=-1, keepdims=True)
    return y / jnp.where(norm > 0, norm, 1.0)


def unit_rows(x: np.ndarray, dtype: np.dtype | type = np.float32, chunk_rows: int = 4096,
              transform: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    r"""Unit-normalise the rows of ``x`` on the host and return them in ``dtype`` (the compute dtype).

    Same scale-free formula as :func:`normalize_rows`, evaluated in float64 (the input's own dtype if it
    is wider), *before* the cast to ``dtype``: a float64 row of size 1e200 would be ``inf`` in float32,
    and a float32 row of size 1e-40 is subnormal (flushed to 0 by XLA on CPU). Every finite non-zero row
    gives the unit vector of its direction to within the rounding of the cast; an all-zero row gives 0.
    Works on memory-mapped arrays ``chunk_rows`` rows at a time (no float64 copy of the whole set).
    ``transform`` (e.g. a fitted feature conditioning, :meth:`sotjax.conditioning.Conditioner.transform`)
    is applied to each float64 block before the normalisation, so it needs no copy of its own either.
    """
    x = np.asarray(x)  # no copy for a memory-mapped array
    work = x.dtype if x.dtype.itemsize > 8 else np.dtype(np.float64)  # (bfloat16 has no np.finfo)
    out = np.empty(x.shape, dtype=dtype)
    for start in range(0, x.shape[0], chunk_rows):
        block = np.asarray(x[start:start + chunk_rows], dtype=work)
        if transform is not None:
            block = transform(block)
        scale = np.max(np.abs(block), axis=1, keepdims=True, initial=0.0)
        block = block / np.where(scale > 0, scale, 1.0)
        norm = np.sqrt(np.sum(block * block, axis=1, keepdims=True))
        out[start:start + chunk_rows] = block / np.where(norm > 0, norm, 1.0)
    return out


@jax.jit
def cosine_cost(x_unit: jax.Array, y_unit: jax.Array) -> jax.Array:
    r"""Dense cosine distance :math:`C = 1 - \hat X \hat Y^\top`, clipped to ``[0, 2]``."""
    return jnp.clip(1.0 - x_unit @ y_unit.T, 0.0, 2.0)


@jax.tree_util.register_pytree_node_class
class KernelGeometry(geometry.Geometry):
    r"""Dense geometry holding both :math:`C` and :math:`K = e^{-C/\varepsilon}`.

    It extends ott-jax's :class:`~ott.geometry.geometry.Geometry` in one place:
    :meth:`apply_kernel` computes :math:`K^\top v` as ``v @ K`` rather than ``K.T @ v``. On XLA:CPU
    the transposed matrix-vector product was 18x slower (59 ms vs 3.3 ms at 5000 x 5000 here), and
    it is half of every kernel-mode Sinkhorn iteration. It also drops ott's ``K ** (epsilon/eps)``:
    ott passes the (traced) current epsilon on every update, so XLA evaluated an elementwise power
    over the whole kernel per iteration. sotjax never schedules epsilon, so ``eps`` always equals
    ``self.epsilon`` and the power is the identity.
    """

    def apply_kernel(self, vec: jax.Array, eps: float | None = None, axis: int = 0) -> jax.Array:
        del eps  # always self.epsilon here (no epsilon schedule): K ** 1 == K
        kernel = self._kernel
        return vec @ kernel if axis == 0 else kernel @ vec

    def __init__(self, cost_matrix: jax.Array, kernel_matrix: jax.Array, epsilon: float,
                 weighted_cost: jax.Array | None = None):
        super().__init__(cost_matrix=cost_matrix, kernel_matrix=kernel_matrix, epsilon=epsilon)
        self._kernel = kernel_matrix  # the same array as ott's ``_kernel_matrix``, typed non-optional
        self._weighted_cost = kernel_matrix * cost_matrix if weighted_cost is None else weighted_cost

    @property
    def kernel_matrix(self) -> jax.Array:
        return self._kernel

    @property
    def weighted_cost(self) -> jax.Array:
        r""":math:`K \odot C`, so that :math:`(T \odot C) v = u \odot ((K\odot C)(v_{\rm scal} \odot v))`
        for a plan :math:`T = \mathrm{diag}(u) K \mathrm{diag}(v)` needs no elementwise pass."""
        return self._weighted_cost

    def tree_flatten(self):  # noqa: D102
        return (self._cost_matrix, self._kernel, self._epsilon_init, self._weighted_cost), None

    @classmethod
    def tree_unflatten(cls, aux_data, children):  # noqa: D102
        del aux_data
        return cls(*children)


@dataclasses.dataclass(frozen=True)
class GeometryInfo:
    r"""What was built: the absolute epsilon, the Sinkhorn mode and the cost range (and, for the
    divergence loss, whether the reference's self-transport :math:`\mathrm{OT}_\varepsilon(b, b)` met
    the Sinkhorn threshold; None when it is not computed)."""

    epsilon: float
    lse_mode: bool
    cost_max: float
    cost_mean: float
    reference_self_converged: bool | None = None


def cosine_geometry(
    x_unit: jax.Array,
    y_unit: jax.Array,
    epsilon: float,
    *,
    lse_mode: str = "auto",
    rows: int | None = None,
) -> tuple[geometry.Geometry, GeometryInfo]:
    r"""Dense cosine geometry between two unit-normalised point sets.

    Args:
      x_unit: ``(n, d)`` unit rows (the corpus).
      y_unit: ``(m, d)`` unit rows (a reference set, or the corpus itself).
      epsilon: entropic regularisation, absolute (cost units).
      lse_mode: ``"log"``, ``"kernel"`` or ``"auto"`` (kernel when
        ``max(C)/epsilon <= MAX_KERNEL_EXPONENT[dtype]``).
      rows: the first ``rows`` rows of ``x_unit`` are real; the rest is zero-mass padding, left
        out of the statistics (and so of the ``auto`` choice).

    Returns:
      The geometry (cost matrix, plus the kernel matrix in kernel mode) and a
      :class:`GeometryInfo` describing it.
    """
    cost = cosine_cost(x_unit, y_unit)
    real = cost if rows is None or rows >= cost.shape[0] else cost[:rows]
    cost_max = float(jnp.max(real))
    cost_mean = float(jnp.mean(real))
    eps = float(epsilon)
    dtype_name = "float64" if cost.dtype == jnp.float64 else "float32"
    use_log = cost_max / eps > MAX_KERNEL_EXPONENT[dtype_name] if lse_mode == "auto" else lse_mode == "log"
    if use_log:
        geom = geometry.Geometry(cost_matrix=cost, epsilon=eps)
    else:
        geom = KernelGeometry(cost_matrix=cost, kernel_matrix=_gibbs_kernel(cost, eps), epsilon=eps)
    return geom, GeometryInfo(epsilon=eps, lse_mode=bool(use_log), cost_max=cost_max, cost_mean=cost_mean)


def mean_cosine_cost(x_unit: jax.Array, y_unit: jax.Array) -> float:
    r"""Mean of :math:`1 - \hat x_i^\top \hat y_j` over all pairs, in :math:`O((n+m)d)`:
    :math:`1 - \bar x^\top \bar y` with the mean unit vectors."""
    return float(1.0 - jnp.mean(x_unit, axis=0) @ jnp.mean(y_unit, axis=0))


@jax.jit
def _gibbs_kernel(cost: jax.Array, epsilon: float) -> jax.Array:
    return jnp.exp(-cost / epsilon)

