r"""The Stage-1 solver: ``SOTSolver(...)(problem) -> SOTOutput`` (the shape of ott-jax's
``Sinkhorn(...)(prob) -> SinkhornOutput``).

One step is a pure jitted function of ``(SOTState, PushPullProblem)``: the Sinkhorn solves of each side
warm-started from the previous step's centred potentials, the gradient of
:func:`sotjax.objective.evaluate`, and the optax update

.. math::
    \theta \leftarrow \theta + \mathrm{opt}(n\,\nabla_\theta J),\qquad
    \mathrm{opt} = \texttt{optax.chain(optax.scale(n), sgd | adam)},

where the factor :math:`n` makes the learning rate independent of the corpus size (the logit gradient
is :math:`w \odot (\cdot)` with :math:`w \sim 1/n`). Only what changes the program is static: the loss
kind and padded shapes (the problem's aux data), the optimiser kind and the inner solvers' settings
(this object); :math:`\lambda, \tau, \varepsilon, n`, the learning rate and the momentum are traced.

The host driver (:meth:`SOTSolver.__call__`) runs the steps in a Python loop so that it can show
progress, call back and stop on the rule of :class:`StopRule`; only scalars come back to the host per
step (corpus-indexed vectors may live on other devices or processes).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sotjax import objective as obj
from sotjax import transport
from sotjax.problem import PushPullProblem, initial_warm_start


def make_optimizer(kind: str, n: int | jax.Array, lr: float | jax.Array = 1.0,
                   momentum: float | jax.Array = 0.9) -> optax.GradientTransformation:
    r"""The logits' optimiser: ``optax.chain(optax.scale(n), sgd | adam)``.

    The gradient is scaled by ``n`` (so that ``lr`` does not depend on the corpus size, see
    :class:`~sotjax.config.SOTConfig`), then SGD with heavy-ball momentum (``momentum = 0`` is plain
    SGD) or Adam. The learning rate and momentum are injected hyperparameters: they live in the
    optimiser state as arrays, so a fit with another ``lr`` or ``momentum`` reuses the compiled step;
    ``n`` may be traced (a new ``n`` in the same size bucket reuses it too).
    """
    if kind == "adam":
        inner = optax.inject_hyperparams(optax.adam)(learning_rate=lr)
    else:
        inner = optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=momentum)
    return optax.chain(optax.scale(n), inner)


@dataclasses.dataclass(frozen=True)
class StopRule:
    r"""Stop after step :math:`k > 1` when :math:`|J_k - J_{k-1}| \le` ``objective_tol`` :math:`\max(1, |J_k|)`
    and :math:`\|w_k - w_{k-1}\|_1 \le` ``weight_tol``, or after ``max_steps`` steps. Both tolerances 0:
    run ``max_steps`` steps."""

    max_steps: int = 50
    objective_tol: float = 1e-6
    weight_tol: float = 1e-4

    def met(self, previous: float, current: float, dw: float) -> bool:
        if self.objective_tol == 0.0 and self.weight_tol == 0.0:
            return False
        return abs(current - previous) <= self.objective_tol * max(1.0, abs(current)) and dw <= self.weight_tol

    def describe(self, dw: float) -> str:
        return f"|dJ| <= {self.objective_tol:g}*max(1,|J|), ||dw||_1 = {dw:.2e} <= {self.weight_tol:g}"


class SOTState(NamedTuple):
    """What one step carries to the next: logits, optimiser state, centred warm-start potentials."""

    logits: jax.Array
    opt_state: Any
    warm: obj.WarmStart


class SOTOutput(NamedTuple):
    """What the solver returns (host arrays of the real rows; per-step traces evaluated *before* each
    update). ``stopped``: the stop rule was met before ``max_steps``."""

    logits: np.ndarray
    objective: np.ndarray
    pull: np.ndarray
    push: np.ndarray
    entropy_term: np.ndarray
    sinkhorn_iterations: np.ndarray  # (steps, 2): safe, harmful
    adjoint_iterations: np.ndarray  # (steps, 2)
    sinkhorn_converged: np.ndarray  # (steps,)
    sinkhorn_error: np.ndarray  # (steps, 2)
    adjoint_converged: np.ndarray  # (steps,)
    stopped: bool
    last_dw: float
    timings: dict[str, float]

    @property
    def n_steps(self) -> int:
        return int(self.objective.shape[0])

    @property
    def weights(self) -> np.ndarray:
        r""":math:`w = \mathrm{softmax}(\theta)` in float64."""
        z = self.logits - self.logits.max()
        e = np.exp(z)
        return e / e.sum()

    @property
    def inner_solves_converged(self) -> bool:
        """Every Sinkhorn solve met its threshold and every adjoint solve stayed below its cap."""
        return bool(np.all(self.sinkhorn_converged) and np.all(self.adjoint_converged))

    @property
    def converged(self) -> bool:
        return self.stopped and self.inner_solves_converged


@functools.partial(jax.jit, static_argnames=("optimizer", "settings"))
def _update(state: SOTState, problem: PushPullProblem, *, optimizer: str, settings: transport.SinkhornSettings
            ) -> tuple[SOTState, obj.Evaluation]:
    """One optimiser step (pure). With a row sharding, every corpus-indexed vector of the new state is
    pinned to it, so that the next step sees the same layouts (and reuses the compiled program)."""
    ev = obj.evaluate(state.logits, problem, state.warm, lam=problem.lam, entropy=problem.entropy,
                      loss=problem.loss, settings=settings)
    updates, opt_state = make_optimizer(optimizer, problem.n).update(ev.grad_logits, state.opt_state, state.logits)
    assert ev.warm is not None
    new = SOTState(optax.apply_updates(state.logits, updates), opt_state, ev.warm)
    if problem.rows is not None:
        new = _pin_rows(new, problem.padded_rows, problem.rows, jax.lax.with_sharding_constraint)
    return new, ev._replace(warm=None, grad_logits=None)  # the host needs only the scalars


def _pin_rows(tree, n_rows: int, sharding, place):
    """Apply ``place(leaf, sharding)`` to every 1-D leaf of length ``n_rows`` (the corpus axis)."""
    def pin(leaf):
        if getattr(leaf, "ndim", 0) == 1 and leaf.shape[0] == n_rows:
            return place(leaf, sharding)
        return leaf

    return jax.tree.map(pin, tree)


@jax.jit
def _weight_change(logits: jax.Array, previous: jax.Array) -> tuple[jax.Array, jax.Array]:
    r""":math:`\|w - w_{\rm prev}\|_1` of the softmax weights and whether ``w`` is finite, on the device."""
    w = jax.nn.softmax(logits)
    return jnp.sum(jnp.abs(w - jax.nn.softmax(previous))), jnp.all(jnp.isfinite(w))


@dataclasses.dataclass(frozen=True)
class SOTSolver:
    """Learns the logits of a :class:`~sotjax.problem.PushPullProblem` (module docstring).

    Attributes:
      optimizer: ``"sgd"`` (heavy-ball momentum) or ``"adam"``.
      lr, momentum: the optimiser's hyperparameters (traced).
      stop_rule: when the host driver stops.
      settings: the inner Sinkhorn and adjoint solvers' settings.
    """

    optimizer: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.9
    stop_rule: StopRule = StopRule()
    settings: transport.SinkhornSettings = transport.SinkhornSettings()

    def init(self, problem: PushPullProblem, logits: jax.Array) -> SOTState:
        """The state before the first step: ``logits`` (``-inf`` on padding rows), a fresh optimiser
        state, zero potentials; placed on the problem's row sharding."""
        n_pad = problem.padded_rows
        warm = initial_warm_start(problem, n_pad, logits.dtype)
        opt_state = make_optimizer(self.optimizer, problem.n, self.lr, self.momentum).init(logits)
        state = SOTState(logits, opt_state, warm)
        if problem.rows is not None:
            replicated = jax.sharding.NamedSharding(problem.rows.mesh, jax.sharding.PartitionSpec())
            state = _pin_rows(state, n_pad, problem.rows, jax.device_put)
            state = jax.tree.map(lambda x: x if getattr(x, "ndim", 0) == 1 and x.shape[0] == n_pad
                                 else jax.device_put(x, replicated), state)
        return state

    def update(self, state: SOTState, problem: PushPullProblem) -> tuple[SOTState, obj.Evaluation]:
        """One step (compiled once per problem structure and solver kind)."""
        return _update(state, problem, optimizer=self.optimizer, settings=self.settings)

    def __call__(
        self,
        problem: PushPullProblem,
        logits: jax.Array,
        *,
        progress: bool = False,
        callback: Callable[[int, dict[str, float]], None] | None = None,
        diagnose: Callable[[], str] = lambda: "",
        rows: int | None = None,
    ) -> SOTOutput:
        """Run steps until the stop rule or ``stop_rule.max_steps`` (the host driver).

        ``logits``: the initial logits (length ``problem.padded_rows``); ``rows``: the real rows to
        return (default all). ``diagnose`` says what helps when the weights stop being finite (the
        error then raised is a :class:`FloatingPointError`).
        """
        return drive(self.init(problem, logits), functools.partial(self.update, problem=problem), self.stop_rule,
                     progress=progress, callback=callback, diagnose=diagnose, rows=rows)


def drive(
    state: Any,
    step_fn: Callable[[Any], tuple[Any, obj.Evaluation]],
    stop_rule: StopRule,
    *,
    progress: bool = False,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    diagnose: Callable[[], str] = lambda: "",
    rows: int | None = None,
) -> SOTOutput:
    """The host loop of a solver (shared by :class:`SOTSolver` and :class:`sotjax.head.HeadSolver`):
    ``state, ev = step_fn(state)`` until ``stop_rule`` or its ``max_steps``. ``state`` is any state with a
    ``logits`` field (the current logits, padded rows ``-inf``); only scalars come to the host per step."""
    jax.block_until_ready(state)
    keys = ("objective", "pull", "push", "entropy", "sk", "adj", "ok", "err", "adj_ok")
    trace: dict[str, list] = {k: [] for k in keys}
    stopped, dw = False, float("nan")
    t0 = time.perf_counter()
    t_first = t0
    bar = _progress_bar(stop_rule.max_steps, progress)
    try:
        for i in range(stop_rule.max_steps):
            previous = state.logits
            state, ev = step_fn(state)
            change, finite = _weight_change(state.logits, previous)
            # only scalars come to the host (the corpus-indexed vectors may span processes)
            ev = jax.device_get(ev)
            if i == 0:
                t_first = time.perf_counter()
            _record(trace, ev)
            if not (np.isfinite(trace["objective"][-1]) and bool(finite)):
                raise FloatingPointError(f"failed at step {i + 1}: the objective or the weights are not"
                                         f" finite ({diagnose()})")
            dw = float(change)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(J=f"{trace['objective'][-1]:.5f}", dw=f"{dw:.1e}", sk=sum(trace["sk"][-1]))
            if callback is not None:
                callback(i, {"objective": trace["objective"][-1], "pull": trace["pull"][-1],
                             "push": trace["push"][-1]})
            if i > 0 and stop_rule.met(trace["objective"][-2], trace["objective"][-1], dw):
                stopped = True
                break
    finally:
        if bar is not None:
            bar.close()
    from sotjax.distributed import allgather_rows  # noqa: PLC0415 - the edge between devices and host

    final = allgather_rows(state.logits).astype(np.float64)[: rows]
    t_end = time.perf_counter()
    return SOTOutput(
        logits=final,
        objective=np.asarray(trace["objective"]),
        pull=np.asarray(trace["pull"]),
        push=np.asarray(trace["push"]),
        entropy_term=np.asarray(trace["entropy"]),
        sinkhorn_iterations=np.asarray(trace["sk"], dtype=np.int64).reshape(-1, 2),
        adjoint_iterations=np.asarray(trace["adj"], dtype=np.int64).reshape(-1, 2),
        sinkhorn_converged=np.asarray(trace["ok"], dtype=bool),
        sinkhorn_error=np.asarray(trace["err"], dtype=np.float64).reshape(-1, 2),
        adjoint_converged=np.asarray(trace["adj_ok"], dtype=bool),
        stopped=stopped,
        last_dw=dw,
        timings={"compile": t_first - t0, "optimize": t_end - t_first},
    )


def _record(trace: dict[str, list], ev: obj.Evaluation) -> None:
    trace["objective"].append(float(ev.objective))
    trace["pull"].append(float(ev.pull.value))
    trace["push"].append(float(ev.push.value))
    trace["entropy"].append(float(ev.entropy_term))
    trace["sk"].append((int(ev.pull.sinkhorn_iterations), int(ev.push.sinkhorn_iterations)))
    trace["adj"].append((int(ev.pull.adjoint_iterations), int(ev.push.adjoint_iterations)))
    trace["ok"].append(bool(ev.pull.sinkhorn_converged) and bool(ev.push.sinkhorn_converged))
    trace["err"].append((float(ev.pull.sinkhorn_error), float(ev.push.sinkhorn_error)))
    trace["adj_ok"].append(bool(ev.pull.adjoint_converged) and bool(ev.push.adjoint_converged))


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sotjax weigh", unit="step", leave=False, disable=None)  # off when not a TTY
