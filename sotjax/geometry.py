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

import jax
import jax.numpy as jnp
from ott.geometry import geometry

# Kernel mode stores exp(-C/eps); keep max(C)/eps below these so that neither the kernel nor
# the Sinkhorn scalings leave the normal range of the dtype (exp(-30) ~ 1e-13 in float32).
MAX_KERNEL_EXPONENT = {"float32": 30.0, "float64": 300.0}


def normalize_rows(x: jax.Array) -> jax.Array:
    r"""Return :math:`x_i / \|x_i\|_2` row-wise (rows must be non-zero; checked at the I/O edge)."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, jnp.finfo(x.dtype).tiny)


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
        kernel = self._kernel_matrix
        return vec @ kernel if axis == 0 else kernel @ vec

    def __init__(self, cost_matrix: jax.Array, kernel_matrix: jax.Array, epsilon: float,
                 weighted_cost: jax.Array | None = None):
        super().__init__(cost_matrix=cost_matrix, kernel_matrix=kernel_matrix, epsilon=epsilon)
        self._weighted_cost = kernel_matrix * cost_matrix if weighted_cost is None else weighted_cost

    @property
    def kernel_matrix(self) -> jax.Array:
        return self._kernel_matrix

    @property
    def weighted_cost(self) -> jax.Array:
        r""":math:`K \odot C`, so that :math:`(T \odot C) v = u \odot ((K\odot C)(v_{\rm scal} \odot v))`
        for a plan :math:`T = \mathrm{diag}(u) K \mathrm{diag}(v)` needs no elementwise pass."""
        return self._weighted_cost

    def tree_flatten(self):  # noqa: D102
        return (self._cost_matrix, self._kernel_matrix, self._epsilon_init, self._weighted_cost), None

    @classmethod
    def tree_unflatten(cls, aux_data, children):  # noqa: D102
        del aux_data
        return cls(*children)


@dataclasses.dataclass(frozen=True)
class GeometryInfo:
    """What was built: the absolute epsilon, the Sinkhorn mode and the cost range."""

    epsilon: float
    lse_mode: bool
    cost_max: float
    cost_mean: float


def cosine_geometry(
    x_unit: jax.Array,
    y_unit: jax.Array,
    epsilon: float,
    *,
    lse_mode: str = "auto",
) -> tuple[geometry.Geometry, GeometryInfo]:
    r"""Dense cosine geometry between two unit-normalised point sets.

    Args:
      x_unit: ``(n, d)`` unit rows (the corpus).
      y_unit: ``(m, d)`` unit rows (a reference set, or the corpus itself).
      epsilon: entropic regularisation, absolute (cost units).
      lse_mode: ``"log"``, ``"kernel"`` or ``"auto"`` (kernel when
        ``max(C)/epsilon <= MAX_KERNEL_EXPONENT[dtype]``).

    Returns:
      The geometry (cost matrix, plus the kernel matrix in kernel mode) and a
      :class:`GeometryInfo` describing it.
    """
    cost = cosine_cost(x_unit, y_unit)
    cost_max = float(jnp.max(cost))
    cost_mean = float(jnp.mean(cost))
    eps = float(epsilon)
    dtype_name = "float64" if cost.dtype == jnp.float64 else "float32"
    if lse_mode == "auto":
        use_log = cost_max / eps > MAX_KERNEL_EXPONENT[dtype_name]
    else:
        use_log = lse_mode == "log"
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

