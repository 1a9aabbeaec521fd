r"""The SOT push-pull objective in the logits (paper Eq. 5/6) and its gradient.

.. math::
    J(\theta) = (1-\lambda)\,L(w, Q_{\rm safe}) - \lambda\,L(w, M_{\rm harm})
                + \tau\,\mathrm{KL}(w\,\|\,\mathbf 1/n),\qquad w = \mathrm{softmax}(\theta),

with :math:`L` one of the losses of :mod:`sotjax.transport` and uniform reference marginals.
The chain rule through the softmax is :math:`\nabla_\theta J = w \odot (g - \langle w, g\rangle)`
with :math:`g = \nabla_w J`, and :math:`\nabla_w \mathrm{KL}(w\|\mathbf 1/n) = \log(n w) + 1`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sotjax import transport
from sotjax.problem import PushPullProblem, Reference, WarmStart  # noqa: F401 - re-exported
from sotjax.transport import SinkhornSettings

MARGINAL_FLOOR = {"float32": 1e-30, "float64": 1e-250}


class TermInfo(NamedTuple):
    """One side's value and solver diagnostics (with the divergence, the corpus self-transport's
    iterations are added and its convergence and-ed in; ``sinkhorn_error`` is the larger error)."""

    value: jax.Array
    sinkhorn_iterations: jax.Array
    sinkhorn_converged: jax.Array
    adjoint_iterations: jax.Array
    adjoint_converged: jax.Array
    sinkhorn_error: jax.Array


class Evaluation(NamedTuple):
    """Objective at the current logits, its gradient and the solver diagnostics."""

    objective: jax.Array
    pull: TermInfo
    push: TermInfo
    entropy_term: jax.Array
    grad_logits: jax.Array | None  # None once the step has used it (not sent to the host)
    warm: WarmStart | None  # None once moved into the solver state


def _zero_info(dtype) -> TermInfo:
    return TermInfo(jnp.zeros((), dtype), jnp.asarray(0), jnp.asarray(True), jnp.asarray(0), jnp.asarray(True),
                    jnp.zeros((), dtype))


def _info(out: transport.LossOutput, value: jax.Array) -> TermInfo:
    return TermInfo(value, out.sinkhorn_iterations, out.sinkhorn_converged, out.adjoint_iterations,
                    out.adjoint_converged, out.sinkhorn_error)


def evaluate(
    logits: jax.Array,
    problem: PushPullProblem,
    warm: WarmStart,
    *,
    lam: float | jax.Array,
    entropy: float | jax.Array,
    loss: str,
    settings: SinkhornSettings,
) -> Evaluation:
    r"""Objective, pull/push terms and :math:`\nabla_\theta J` at ``logits`` (pure; jit the caller).

    For ``loss="divergence"`` the corpus self-transport :math:`\mathrm{OT}_\varepsilon(w, w)` is
    shared by both sides and solved once: with :math:`\kappa = (1-\lambda) - \lambda` (only the
    present sides counted), the objective gains :math:`-\tfrac{\kappa}{2}\mathrm{OT}_\varepsilon(w,w)`
    and its gradient :math:`-\kappa\,\tilde p_{ww}`.
    """
    dtype = logits.dtype
    # zero-mass padding rows (sotjax.sharding) have logit -inf: weight 0, gradient 0, and they do not
    # count in the entropy term's n
    valid = logits > -jnp.inf
    n = jnp.sum(valid).astype(dtype)
    w = jax.nn.softmax(logits)
    # Solvers see the weights floored at MARGINAL_FLOOR: once the mass collapses, softmax weights
    # underflow to exactly 0, which makes Sinkhorn scalings 0 and centred potentials 0 * inf = NaN.
    # The floor changes the total mass by at most n * 1e-30 (below float32 resolution).
    a = jnp.maximum(w, MARGINAL_FLOOR[jnp.dtype(dtype).name])
    cross = transport.transport_loss if loss == "transport" else transport.regularized_loss
    grad_w = jnp.zeros_like(w)
    objective = jnp.zeros((), dtype)
    pull, push = _zero_info(dtype), _zero_info(dtype)
    outs = {}
    for side, sign in (("safe", 1.0 - lam), ("harmful", -lam)):
        ref = getattr(problem, side)
        if ref is None:
            continue
        out = cross(ref.geom, a, ref.b, getattr(warm, side), settings)
        objective = objective + sign * out.value
        grad_w = grad_w + sign * out.grad_a
        outs[side] = (out, sign, ref)

    self_pot = warm.corpus_self
    self_value = jnp.zeros((), dtype)
    self_out = None
    if loss == "divergence":
        assert problem.corpus_geom is not None and self_pot is not None, "the divergence needs the corpus geometry"
        kappa = sum(sign for _, sign, _ in outs.values())
        self_value, self_pot, self_out = transport.self_transport(problem.corpus_geom, a, self_pot, settings)
        objective = objective - 0.5 * kappa * self_value
        grad_w = grad_w - kappa * self_pot

    for side, (out, sign, ref) in outs.items():
        value = out.value
        if self_out is not None:  # S(w, b) = OT(w, b) - OT(w, w)/2 - OT(b, b)/2
            value = value - 0.5 * self_value - 0.5 * ref.ot_bb
            objective = objective - 0.5 * sign * ref.ot_bb
            out = out._replace(
                sinkhorn_iterations=out.sinkhorn_iterations + self_out.n_iters,
                sinkhorn_converged=out.sinkhorn_converged & self_out.converged,
                sinkhorn_error=jnp.maximum(out.sinkhorn_error, self_out.error),
            )
        if side == "safe":
            pull = _info(out, value)
        else:
            push = _info(out, value)

    log_nw = jnp.log(jnp.maximum(n * w, jnp.finfo(dtype).tiny))
    entropy_term = jnp.sum(w * log_nw)
    # always added (0 * finite = 0 when tau = 0), so that tau is a traced value, not a program switch
    objective = objective + entropy * entropy_term
    grad_w = grad_w + entropy * (log_nw + 1.0)

    grad_logits = jnp.where(valid, w * (grad_w - jnp.vdot(w, jnp.where(valid, grad_w, 0.0))), 0.0)
    new_warm = WarmStart(
        outs["safe"][0].potentials if "safe" in outs else warm.safe,
        outs["harmful"][0].potentials if "harmful" in outs else warm.harmful,
        self_pot,
    )
    return Evaluation(objective, pull, push, entropy_term, grad_logits, new_warm)
