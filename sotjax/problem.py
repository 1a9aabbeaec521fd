r"""The push-pull problem of Stage 1 as a registered pytree (the shape of ott-jax's ``LinearProblem``).

.. math::
    \min_\theta\; J(\theta) = (1-\lambda)\,L(w, Q_{\rm safe}) - \lambda\,L(w, M_{\rm harm})
        + \tau\,\mathrm{KL}(w\,\|\,\mathbf 1/n),\qquad w = \mathrm{softmax}(\theta),

with :math:`L` the OT loss ``loss`` (:mod:`sotjax.transport`). Everything the solver needs and that
stays fixed while the weights move is here: per reference side, the corpus-reference geometry
(dense, streamed or sharded; :mod:`sotjax.geometry`, :mod:`sotjax.streaming`), the reference marginal
:math:`b` and, for the Sinkhorn divergence, the constant :math:`\mathrm{OT}_\varepsilon(b, b)`; the
corpus x corpus geometry of the divergence's self term; :math:`\lambda`, :math:`\tau` and the real
corpus size :math:`n`.

Arrays and hyperparameters are *children* (traced: a :math:`\lambda`, :math:`\tau`, :math:`\varepsilon`
sweep or a new :math:`n` in the same size bucket reuses the compiled step); what changes the program
is *aux data*: the loss kind, the padded row count and the row sharding. The corpus axis is padded
with zero-mass rows to ``padded_rows`` (:func:`sotjax.plan.padded_rows`); only the first ``n`` rows are
real. Built by one constructor, :func:`build_problem`, from embeddings, config and plan.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from ott.geometry import geometry

from sotjax import transport
from sotjax.geometry import GeometryInfo, cosine_geometry, mean_cosine_cost, normalize_rows
from sotjax.sharding import put_replicated, row_sharding
from sotjax.streaming import stored_kernel, streamed_cosine
from sotjax.transport import Potentials

if TYPE_CHECKING:
    from sotjax.config import SOTConfig
    from sotjax.plan import MemoryPlan


class Reference(NamedTuple):
    """One side of the objective: geometry corpus->reference, its marginal, and constants."""

    geom: Any  # an ott-jax Geometry (dense) or a sotjax.streaming.StreamedCosine (row blocks)
    b: jax.Array
    ot_bb: jax.Array  # OT_eps(b, b): only used by the divergence loss (0 otherwise)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["safe", "harmful", "corpus_geom", "lam", "entropy", "n"],
                   meta_fields=["loss", "padded_rows", "rows"])
@dataclasses.dataclass(frozen=True)
class PushPullProblem:
    """The Stage-1 problem (module docstring).

    Attributes:
      safe: the pull side (None when ``lam == 1``).
      harmful: the push side (None when ``lam == 0``).
      corpus_geom: corpus x corpus geometry, only for the divergence loss.
      lam, entropy: :math:`\\lambda` and :math:`\\tau` (traced scalars).
      n: the real corpus rows (a traced scalar; ``padded_rows - n`` rows of zero mass follow them).
      loss: ``"transport"``, ``"regularized"`` or ``"divergence"`` (static).
      padded_rows: the length of every corpus-indexed vector (static).
      rows: the :class:`~jax.sharding.NamedSharding` of corpus-indexed vectors, or None (one device).
    """

    safe: Reference | None
    harmful: Reference | None
    corpus_geom: geometry.Geometry | None
    lam: jax.Array
    entropy: jax.Array
    n: jax.Array
    loss: str = "transport"
    padded_rows: int = 0
    rows: Any = None

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.asarray(self.lam).dtype

    @property
    def sides(self) -> dict[str, Reference]:
        """The present reference sides by name."""
        return {k: v for k, v in (("safe", self.safe), ("harmful", self.harmful)) if v is not None}

    def replace(self, **changes: Any) -> PushPullProblem:
        """A copy with fields replaced, e.g. another ``lam`` (same compiled step)."""
        return dataclasses.replace(self, **changes)


class WarmStart(NamedTuple):
    """Centred potentials carried from one outer step to the next."""

    safe: Potentials | None
    harmful: Potentials | None
    corpus_self: jax.Array | None


def build_problem(
    corpus: jax.Array, safe: jax.Array | None, harmful: jax.Array | None, config: SOTConfig,
    plan: MemoryPlan | None = None, *, rows: int | None = None, mesh=None,
    settings: transport.SinkhornSettings | None = None,
) -> tuple[PushPullProblem, dict[str, GeometryInfo | None]]:
    """The problem's one constructor: normalise once and build the fixed geometries (and divergence
    constants) of the plan, from unit-normalisable embeddings (on the device), config and plan.

    With a streamed ``plan`` the corpus-reference geometries are
    :class:`~sotjax.streaming.StreamedCosine` (row blocks of ``plan.block_rows``, nothing ``n x m``
    stored); their :class:`GeometryInfo` has ``cost_max`` NaN (not computed: it would cost a pass).

    One absolute epsilon serves every OT term. With ``relative_epsilon`` it is ``config.epsilon``
    times the mean cosine cost between the corpus and the (present) references pooled, so that the
    three terms of a Sinkhorn divergence share it as they must.

    ``rows``: the real corpus rows when ``corpus`` is padded with zero rows (zero mass; the statistics
    of :class:`GeometryInfo` and the relative epsilon are taken over the real rows only). ``mesh``:
    the device mesh the corpus rows are split over (:mod:`sotjax.sharding`), or None. ``settings``:
    the Sinkhorn settings of the divergence's reference self-transport (default: ott-like defaults).
    Returns the problem and a :class:`GeometryInfo` per side (None for an absent side).
    """
    x = normalize_rows(corpus)
    rows = int(x.shape[0]) if rows is None else int(rows)
    settings = transport.SinkhornSettings() if settings is None else settings
    present = {"safe": safe if config.lam < 1.0 else None, "harmful": harmful if config.lam > 0.0 else None}
    units = {side: normalize_rows(y) for side, y in present.items() if y is not None}
    eps = float(config.epsilon)
    if config.relative_epsilon:
        pooled = jnp.concatenate(list(units.values()), axis=0)
        eps *= max(mean_cosine_cost(x[:rows], pooled), 1e-12)

    def geometry_of(p, q):
        return cosine_geometry(p, q, eps, lse_mode=config.lse_mode, rows=rows if p is x else None)

    def corpus_geometry(y):
        """Corpus x reference: in row blocks under a streamed plan (the small reference-side
        geometries of the divergence stay dense), the bfloat16 kernel in row blocks under dense-bf16
        (:func:`~sotjax.streaming.stored_kernel`: its cost_max is that of the real rows; Sinkhorn runs
        on log potentials, hence ``lse_mode`` True as for the streamed plan), else dense."""
        if plan is not None and plan.kind == "dense-bf16":
            geom, cost_max = stored_kernel(x, y, int(plan.block_rows or 1), eps, mesh, rows=rows)
            # the mean cost from column sums (padding rows are zero): x[:rows] would be one more n x d copy
            # next to the kernel, at the peak (measured: +1.5 KB per corpus row at d = 384)
            cost_mean = float(1.0 - (jnp.sum(x, axis=0) / rows) @ jnp.mean(y, axis=0))
            return geom, GeometryInfo(epsilon=eps, lse_mode=True, cost_max=cost_max, cost_mean=cost_mean)
        if plan is not None and plan.kind == "stream":
            info = GeometryInfo(epsilon=eps, lse_mode=True, cost_max=float("nan"),
                                cost_mean=mean_cosine_cost(x[:rows], y))
            return streamed_cosine(x, y, int(plan.block_rows or 1), eps, mesh), info
        return geometry_of(x, y)

    infos: dict[str, GeometryInfo | None] = {"safe": None, "harmful": None}
    refs: dict[str, Reference | None] = {"safe": None, "harmful": None}
    divergence = config.loss == "divergence"
    for side, y in units.items():
        geom, info = corpus_geometry(y)
        m = y.shape[0]
        b = put_replicated(np.full((m,), 1.0 / m, dtype=x.dtype), mesh)
        ot_bb = put_replicated(np.zeros((), x.dtype), mesh)
        if divergence:
            ot_bb, bb_converged = _reference_self_transport(geometry_of(y, y)[0], b, settings)
            info = dataclasses.replace(info, reference_self_converged=bool(bb_converged))
        refs[side] = Reference(geom, b, ot_bb)
        infos[side] = info
    corpus_geom = geometry_of(x, x)[0] if divergence else None
    scalar = functools.partial(put_replicated, mesh=mesh)
    problem = PushPullProblem(
        refs["safe"], refs["harmful"], corpus_geom, lam=scalar(np.asarray(config.lam, x.dtype)),
        entropy=scalar(np.asarray(config.entropy, x.dtype)), n=scalar(np.asarray(rows, x.dtype)),
        loss=config.loss, padded_rows=int(x.shape[0]), rows=row_sharding(mesh))
    return problem, infos


@functools.partial(jax.jit, static_argnames=("settings",))
def _reference_self_transport(geom, b, settings: transport.SinkhornSettings) -> tuple[jax.Array, jax.Array]:
    """The divergence's constant OT_eps(b, b) and whether its solve met the threshold (compiled once)."""
    value, _, solve = transport.self_transport(geom, b, jnp.zeros_like(b), settings)
    return value, solve.converged


def initial_warm_start(problem: PushPullProblem, n: int, dtype) -> WarmStart:
    def zeros(ref):
        return None if ref is None else transport.zero_potentials(n, ref.b.shape[0], dtype)

    self_pot = jnp.zeros((n,), dtype) if problem.corpus_geom is not None else None
    return WarmStart(zeros(problem.safe), zeros(problem.harmful), self_pot)
