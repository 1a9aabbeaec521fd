r"""SOT Stage 1: learn per-sample weights ``w = softmax(logits)`` with optax.

The loop is a plain Python loop over one jitted step (Sinkhorn solves, the gradient of
:mod:`sotjax.objective`, the optax update), so that progress can be shown and the loop can stop
on tolerance. Sinkhorn potentials are warm-started from the previous step.

Optimiser. Logit gradients are multiplied by ``n`` before the optax update so that ``lr`` is
independent of the corpus size (see :class:`~sotjax.config.SOTConfig`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sotjax import objective as obj
from sotjax import transport
from sotjax.config import SOTConfig
from sotjax.errors import SotjaxInputError
from sotjax.geometry import GeometryInfo, cosine_geometry, mean_cosine_cost, normalize_rows


@dataclasses.dataclass(frozen=True)
class SOTResult:
    """What Stage 1 learned, with the trace of how it got there.

    Attributes:
      weights: ``(n,)`` simplex weights ``softmax(logits)`` after the last step.
      logits: ``(n,)`` final logits (rank by these: they do not underflow).
      objective, pull, push, entropy_term: per-step traces (evaluated *before* each update).
      sinkhorn_iterations: ``(steps, 2)`` iterations of the safe/harmful solves per step.
      adjoint_iterations: ``(steps, 2)`` CG iterations of the transport-loss gradients.
      sinkhorn_converged: ``(steps,)`` whether every inner solve of the step met its threshold.
      converged: whether the stopping rule was met before ``config.steps``.
      message: one line saying how the run ended.
      timings: seconds for ``setup`` (normalise, geometries), ``compile`` (first step incl.
        compilation), ``optimize`` (the remaining steps) and ``total``.
      geometry: :class:`GeometryInfo` of the safe and harmful problems.
    """

    weights: np.ndarray
    logits: np.ndarray
    objective: np.ndarray
    pull: np.ndarray
    push: np.ndarray
    entropy_term: np.ndarray
    sinkhorn_iterations: np.ndarray
    adjoint_iterations: np.ndarray
    sinkhorn_converged: np.ndarray
    converged: bool
    n_steps: int
    message: str
    timings: dict[str, float]
    geometry: dict[str, GeometryInfo | None]
    config: SOTConfig


def make_optimizer(config: SOTConfig) -> optax.GradientTransformation:
    """The logits' optimiser: SGD with heavy-ball momentum, or Adam."""
    if config.optimizer == "adam":
        return optax.adam(config.lr)
    return optax.sgd(config.lr, momentum=config.momentum or None)


def settings_from(config: SOTConfig) -> transport.SinkhornSettings:
    return transport.SinkhornSettings(
        threshold=config.sinkhorn_threshold,
        max_iterations=config.sinkhorn_max_iterations,
        adjoint_tol=config.adjoint_tol,
        adjoint_max_iterations=config.adjoint_max_iterations,
    )


def _check_set(name: str, x: np.ndarray) -> None:
    if x.ndim != 2:
        raise SotjaxInputError(f"{name}: expected a 2-D array (samples x dim), got shape {x.shape}")
    if x.shape[0] == 0:
        raise SotjaxInputError(f"{name}: empty set (0 samples)")
    if not np.all(np.isfinite(x)):
        bad = int(np.argwhere(~np.isfinite(x))[0, 0])
        raise SotjaxInputError(f"{name}: non-finite value (NaN or inf) in row {bad}")
    norms = np.linalg.norm(x, axis=1)
    if np.any(norms == 0):
        raise SotjaxInputError(f"{name}: row {int(np.argmin(norms))} is the zero vector (cosine undefined)")


def validate_inputs(
    corpus: np.ndarray, safe: np.ndarray | None, harmful: np.ndarray | None,
    names: dict[str, str] | None = None,
) -> None:
    """Shape, finiteness and dimension checks with one-line errors naming the set.

    ``names`` maps ``corpus``/``safe``/``harmful`` to what the message calls them (e.g. file paths).
    """
    names = {"corpus": "corpus", "safe": "safe", "harmful": "harmful", **(names or {})}
    _check_set(names["corpus"], corpus)
    if corpus.shape[0] < 2:
        raise SotjaxInputError(f"{names['corpus']}: corpus needs at least 2 samples, got {corpus.shape[0]}")
    for key, x in (("safe", safe), ("harmful", harmful)):
        if x is None:
            continue
        _check_set(names[key], x)
        if x.shape[1] != corpus.shape[1]:
            raise SotjaxInputError(
                f"{names[key]}: embedding dimension {x.shape[1]} does not match the corpus dimension"
                f" {corpus.shape[1]}"
            )


def build_problem(
    corpus: jax.Array, safe: jax.Array | None, harmful: jax.Array | None, config: SOTConfig
) -> tuple[obj.PushPullProblem, dict[str, GeometryInfo | None]]:
    """Normalise once and build the fixed geometries (and divergence constants).

    One absolute epsilon serves every OT term. With ``relative_epsilon`` it is ``config.epsilon``
    times the mean cosine cost between the corpus and the (present) references pooled, so that the
    three terms of a Sinkhorn divergence share it as they must.
    """
    x = normalize_rows(corpus)
    settings = settings_from(config)
    present = {"safe": safe if config.lam < 1.0 else None, "harmful": harmful if config.lam > 0.0 else None}
    units = {side: normalize_rows(y) for side, y in present.items() if y is not None}
    eps = float(config.epsilon)
    if config.relative_epsilon:
        pooled = jnp.concatenate(list(units.values()), axis=0)
        eps *= max(mean_cosine_cost(x, pooled), 1e-12)
    geometry_of = lambda p, q: cosine_geometry(p, q, eps, lse_mode=config.lse_mode)
    infos: dict[str, GeometryInfo | None] = {"safe": None, "harmful": None}
    refs: dict[str, obj.Reference | None] = {"safe": None, "harmful": None}
    divergence = config.loss == "divergence"
    for side, y in units.items():
        geom, info = geometry_of(x, y)
        m = y.shape[0]
        b = jnp.full((m,), 1.0 / m, dtype=x.dtype)
        ot_bb = jnp.zeros((), x.dtype)
        if divergence:
            ot_bb, _, _ = transport.self_transport(geometry_of(y, y)[0], b, jnp.zeros((m,), x.dtype), settings)
        refs[side] = obj.Reference(geom, b, ot_bb)
        infos[side] = info
    corpus_geom = geometry_of(x, x)[0] if divergence else None
    return obj.PushPullProblem(refs["safe"], refs["harmful"], corpus_geom), infos


def initial_warm_start(problem: obj.PushPullProblem, n: int, dtype) -> obj.WarmStart:
    def zeros(ref):
        return None if ref is None else transport.zero_potentials(n, ref.b.shape[0], dtype)

    self_pot = jnp.zeros((n,), dtype) if problem.corpus_geom is not None else None
    return obj.WarmStart(zeros(problem.safe), zeros(problem.harmful), self_pot)


@functools.partial(jax.jit, static_argnames=("config",))
def _step(logits, opt_state, warm, problem, config: SOTConfig):
    ev = obj.evaluate(
        logits, problem, warm,
        lam=config.lam, entropy=config.entropy, loss=config.loss, settings=settings_from(config),
    )
    grads = logits.shape[0] * ev.grad_logits
    updates, opt_state = make_optimizer(config).update(grads, opt_state, logits)
    return optax.apply_updates(logits, updates), opt_state, ev


@contextlib.contextmanager
def _precision(dtype: str):
    if dtype == "float64":
        with jax.enable_x64(True):
            yield jnp.float64
    else:
        yield jnp.float32


def fit(
    corpus: np.ndarray,
    safe: np.ndarray | None,
    harmful: np.ndarray | None,
    config: SOTConfig = SOTConfig(),
    *,
    progress: bool = False,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    names: dict[str, str] | None = None,
) -> SOTResult:
    r"""Learn SOT weights for ``corpus`` against the safe anchor and the harmful reference.

    Args:
      corpus: ``(n, d)`` embeddings of the fine-tuning corpus (any scale: rows are normalised).
      safe: ``(N_s, d)`` safe-anchor embeddings (may be None when ``config.lam == 1``).
      harmful: ``(N_h, d)`` harmful-reference embeddings (may be None when ``config.lam == 0``).
      config: a validated :class:`SOTConfig`.
      progress: show a progress bar (stderr) while learning.
      callback: called after every step with ``(step, {"objective", "pull", "push"})``.
      names: what input errors call the sets (e.g. their file paths); default corpus/safe/harmful.

    Returns:
      A :class:`SOTResult` (NumPy arrays). Deterministic for given inputs and config.
    """
    t0 = time.perf_counter()
    corpus = np.asarray(corpus)
    safe = None if safe is None or config.lam == 1.0 else np.asarray(safe)
    harmful = None if harmful is None or config.lam == 0.0 else np.asarray(harmful)
    if config.lam < 1.0 and safe is None:
        raise SotjaxInputError("safe: a safe anchor set is required when lam < 1")
    if config.lam > 0.0 and harmful is None:
        raise SotjaxInputError("harmful: a harmful reference set is required when lam > 0")
    validate_inputs(corpus, safe, harmful, names)
    n = corpus.shape[0]

    with _precision(config.dtype) as dtype:
        as_dev = lambda x: None if x is None else jnp.asarray(x, dtype=dtype)
        problem, infos = build_problem(as_dev(corpus), as_dev(safe), as_dev(harmful), config)
        warm = initial_warm_start(problem, n, dtype)
        logits = jnp.zeros((n,), dtype)
        opt_state = make_optimizer(config).init(logits)
        jax.block_until_ready(problem)
        t_setup = time.perf_counter()

        trace: dict[str, list] = {k: [] for k in ("objective", "pull", "push", "entropy", "sk", "adj", "ok")}
        prev_w = np.full(n, 1.0 / n)
        converged = False
        message = ""
        t_first = t_setup
        bar = _progress_bar(config.steps, progress)
        try:
            for step in range(config.steps):
                logits, opt_state, ev = _step(logits, opt_state, warm, problem, config)
                warm = ev.warm
                ev = jax.device_get(ev._replace(warm=None))
                if step == 0:
                    t_first = time.perf_counter()
                trace["objective"].append(float(ev.objective))
                trace["pull"].append(float(ev.pull.value))
                trace["push"].append(float(ev.push.value))
                trace["entropy"].append(float(ev.entropy_term))
                trace["sk"].append((int(ev.pull.sinkhorn_iterations), int(ev.push.sinkhorn_iterations)))
                trace["adj"].append((int(ev.pull.adjoint_iterations), int(ev.push.adjoint_iterations)))
                trace["ok"].append(bool(ev.pull.sinkhorn_converged) and bool(ev.push.sinkhorn_converged))
                w = np.asarray(jax.nn.softmax(logits), dtype=np.float64)
                if not (np.isfinite(trace["objective"][-1]) and np.all(np.isfinite(w))):
                    message = f"failed at step {step + 1}: the objective or the weights are not finite"
                    raise FloatingPointError(message)
                dw = float(np.abs(w - prev_w).sum())
                prev_w = w
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(J=f"{trace['objective'][-1]:.5f}", dw=f"{dw:.1e}", sk=sum(trace["sk"][-1]))
                if callback is not None:
                    callback(step, {"objective": trace["objective"][-1], "pull": trace["pull"][-1],
                                    "push": trace["push"][-1]})
                if step > 0 and _stopping_rule(trace["objective"], dw, config):
                    converged = True
                    message = (f"converged after {step + 1} steps (|dJ| <= {config.objective_tol:g}*max(1,|J|),"
                               f" ||dw||_1 = {dw:.2e} <= {config.weight_tol:g})")
                    break
        finally:
            if bar is not None:
                bar.close()
        n_steps = len(trace["objective"])
        if not message:
            dj = abs(trace["objective"][-1] - trace["objective"][-2]) if n_steps > 1 else float("nan")
            message = (f"did not converge: stopped at the step limit ({n_steps} steps); last |dJ| = {dj:.2e},"
                       f" ||dw||_1 = {dw:.2e}")
        final_logits = np.asarray(logits, dtype=np.float64)
        weights = np.asarray(jax.nn.softmax(logits), dtype=np.float64)
    t_end = time.perf_counter()
    if not all(trace["ok"]):
        message += f"; {trace['ok'].count(False)} step(s) had a Sinkhorn solve that hit max iterations"
    return SOTResult(
        weights=weights,
        logits=final_logits,
        objective=np.asarray(trace["objective"]),
        pull=np.asarray(trace["pull"]),
        push=np.asarray(trace["push"]),
        entropy_term=np.asarray(trace["entropy"]),
        sinkhorn_iterations=np.asarray(trace["sk"], dtype=np.int64).reshape(-1, 2),
        adjoint_iterations=np.asarray(trace["adj"], dtype=np.int64).reshape(-1, 2),
        sinkhorn_converged=np.asarray(trace["ok"], dtype=bool),
        converged=converged,
        n_steps=n_steps,
        message=message,
        timings={
            "setup": t_setup - t0,
            "compile": t_first - t_setup,
            "optimize": t_end - t_first,
            "total": t_end - t0,
        },
        geometry=infos,
        config=config,
    )


def _stopping_rule(objective: list[float], dw: float, config: SOTConfig) -> bool:
    if config.objective_tol == 0.0 and config.weight_tol == 0.0:
        return False
    dj = abs(objective[-1] - objective[-2])
    return dj <= config.objective_tol * max(1.0, abs(objective[-1])) and dw <= config.weight_tol


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sotjax weigh", unit="step", leave=False, disable=None)  # off when not a TTY
