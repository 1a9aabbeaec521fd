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
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sotjax import problem as problem_lib
from sotjax import transport
from sotjax.conditioning import Conditioner
from sotjax.config import SOTConfig
from sotjax.errors import SotjaxInputError
from sotjax.geometry import (
    MAX_KERNEL_EXPONENT,
    GeometryInfo,
    unit_rows,
)
from sotjax.plan import MemoryPlan, plan_memory
from sotjax.problem import PushPullProblem, initial_warm_start  # noqa: F401 - initial_warm_start: API
from sotjax.sharding import corpus_mesh, mesh_size, put_replicated, put_rows
from sotjax.solver import SOTOutput, SOTSolver, StopRule, make_optimizer  # noqa: F401 - make_optimizer: API


@dataclasses.dataclass(frozen=True)
class SOTResult:
    """What Stage 1 learned, with the trace of how it got there.

    Attributes:
      weights: ``(n,)`` simplex weights ``softmax(logits)`` after the last step (float64, from the final
        logits: no underflow to 0 however far the weights collapse).
      logits: ``(n,)`` final logits (rank by these: they do not underflow).
      objective, pull, push, entropy_term: per-step traces (evaluated *before* each update).
      sinkhorn_iterations: ``(steps, 2)`` iterations of the safe/harmful solves per step.
      adjoint_iterations: ``(steps, 2)`` CG iterations of the transport-loss gradients.
      sinkhorn_converged: ``(steps,)`` whether every inner solve of the step met its threshold.
      sinkhorn_error: ``(steps, 2)`` final L1 marginal error of the safe/harmful solves (with the
        divergence, the larger of it and the corpus self-transport's).
      adjoint_converged: ``(steps,)`` whether the transport-loss adjoint solves stayed below their cap.
      converged: whether the stopping rule was met before ``config.steps`` *and* every inner solve of
        the run (Sinkhorn, adjoint, the divergence's reference self-transport) met its tolerance; when
        not, ``message`` says which and what helps.
      message: one line saying how the run ended.
      timings: seconds for ``setup`` (normalise, geometries), ``compile`` (first step incl.
        compilation), ``optimize`` (the remaining steps) and ``total``.
      geometry: :class:`GeometryInfo` of the safe and harmful problems.
      conditioner: the fitted feature conditioning (None for ``conditioning="raw"``); apply it to
        anything later scored against this run.
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
    sinkhorn_error: np.ndarray
    adjoint_converged: np.ndarray
    converged: bool
    n_steps: int
    message: str
    timings: dict[str, float]
    geometry: dict[str, GeometryInfo | None]
    config: SOTConfig
    plan: MemoryPlan | None = None
    conditioner: Conditioner | None = None


def settings_from(config: SOTConfig) -> transport.SinkhornSettings:
    return transport.SinkhornSettings(
        threshold=config.sinkhorn_threshold,
        max_iterations=config.sinkhorn_max_iterations,
        adjoint_tol=config.adjoint_tol,
        adjoint_max_iterations=config.adjoint_max_iterations,
    )


def solver_from(config: SOTConfig) -> SOTSolver:
    """The :class:`~sotjax.solver.SOTSolver` of a config's solver layer."""
    return SOTSolver(optimizer=config.optimizer, lr=config.lr, momentum=config.momentum,
                     stop_rule=StopRule(config.steps, config.objective_tol, config.weight_tol),
                     settings=settings_from(config))


def _check_set(name: str, x: np.ndarray, offset: int = 0) -> None:
    """Shape, finiteness and zero-row checks of one set (``offset``: the global index of row 0)."""
    if x.ndim != 2:
        raise SotjaxInputError(f"{name}: expected a 2-D array (samples x dim), got shape {x.shape}")
    if x.shape[0] == 0:
        raise SotjaxInputError(f"{name}: empty set (0 samples)")
    if not np.all(np.isfinite(x)):
        bad = int(np.argwhere(~np.isfinite(x))[0, 0])
        raise SotjaxInputError(f"{name}: non-finite value (NaN or inf) in row {offset + bad}")
    # only an all-zero row has no direction: any finite non-zero row normalises (geometry.unit_rows),
    # however large or small (a norm computed as sqrt(sum x^2) would overflow at 1e20 in float32 and
    # underflow to 0 at 1e-30)
    zero = ~np.any(x != 0, axis=1)
    if np.any(zero):
        raise SotjaxInputError(f"{name}: row {offset + int(np.argmax(zero))} is the zero vector (cosine undefined)")


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


def memory_plan(corpus: np.ndarray, safe: np.ndarray | None, harmful: np.ndarray | None,
                config: SOTConfig, devices: int = 1) -> MemoryPlan:
    """The plan of this fit (:func:`sotjax.plan.plan_memory`): dense when it fits the budget, else the
    bfloat16 kernel (dense-bf16: float32, with an absolute epsilon large enough for the kernel), else
    streamed; one-line error when nothing fits or the divergence loss would need streaming."""
    refs = tuple(int(x.shape[0]) for x in (safe, harmful) if x is not None)
    epsilon = None if config.relative_epsilon else float(config.epsilon)  # relative: known after the data
    plan = plan_memory(int(corpus.shape[0]), refs, int(corpus.shape[1]), dtype=config.dtype, loss=config.loss,
                       budget_bytes=config.memory_budget, kind=config.plan, devices=devices, epsilon=epsilon)
    if plan.kind == "stream" and config.loss == "divergence":
        raise SotjaxInputError(
            f"--plan: the divergence loss has no streamed plan yet (its corpus x corpus term) and the dense plan "
            f"does not fit ({plan.reason}); use --loss transport or regularized, or raise --memory-budget")
    return plan


def build_problem(
    corpus: jax.Array, safe: jax.Array | None, harmful: jax.Array | None, config: SOTConfig,
    plan: MemoryPlan | None = None, *, rows: int | None = None, mesh=None,
) -> tuple[PushPullProblem, dict[str, GeometryInfo | None]]:
    """:func:`sotjax.problem.build_problem` with the inner solvers' settings of ``config``."""
    return problem_lib.build_problem(corpus, safe, harmful, config, plan, rows=rows, mesh=mesh,
                                     settings=settings_from(config))


@contextlib.contextmanager
def _precision(dtype: str):
    if dtype == "float64":
        with jax.enable_x64(True):
            yield jnp.float64
    else:
        yield jnp.float32


_DEFAULT_CONFIG = SOTConfig()


def fit(
    corpus: np.ndarray,
    safe: np.ndarray | None,
    harmful: np.ndarray | None,
    config: SOTConfig = _DEFAULT_CONFIG,
    *,
    progress: bool = False,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    names: dict[str, str] | None = None,
) -> SOTResult:
    r"""Learn SOT weights for ``corpus`` against the safe anchor and the harmful reference.

    Args:
      corpus: ``(n, d)`` embeddings of the fine-tuning corpus (any scale: rows are normalised on the
        host in float64 before the cast to ``config.dtype``, see :func:`~sotjax.geometry.unit_rows`).
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
    if not (hasattr(corpus, "shape") and hasattr(corpus, "dtype") and hasattr(corpus, "__getitem__")):
        corpus = np.asarray(corpus)  # array-likes; arrays and memory maps are read by rows, as needed
    safe = None if safe is None or config.lam == 1.0 else np.asarray(safe)
    harmful = None if harmful is None or config.lam == 0.0 else np.asarray(harmful)
    if config.lam < 1.0 and safe is None:
        raise SotjaxInputError("safe: a safe anchor set is required when lam < 1")
    if config.lam > 0.0 and harmful is None:
        raise SotjaxInputError("harmful: a harmful reference set is required when lam > 0")
    n = corpus.shape[0]
    processes = jax.process_count()
    # every process validates the references; the corpus rows are validated by the process that owns them
    validate_inputs(corpus if processes == 1 else corpus[: min(n, 2)], safe, harmful, names)
    mesh = corpus_mesh(config.devices)
    plan = memory_plan(corpus, safe, harmful, config, devices=mesh_size(mesh))
    n_pad = max(plan.padded_rows, n)
    own = None if processes == 1 else _own_rows(corpus, n_pad, names)
    conditioner = fit_conditioner(corpus if own is None else own[1], safe, harmful, config, names,
                                  split=own is not None)

    with _precision(config.dtype):
        np_dtype = np.dtype(config.dtype)

        def as_dev(x: np.ndarray | None, key: str) -> jax.Array | None:
            return None if x is None else put_replicated(_unit(x, np_dtype, conditioner, key, names), mesh)

        # padding: zero rows of zero mass, logit -inf (softmax weight exactly 0, gradient 0)
        if processes == 1:
            corpus_dev = put_rows(_padded(_unit(corpus, np_dtype, conditioner, "corpus", names), n_pad), mesh)
            logits = put_rows(np.where(np.arange(n_pad) < n, 0.0, -np.inf).astype(np_dtype), mesh)
        else:
            assert own is not None
            corpus_dev, logits = _process_rows(own, n, n_pad, np_dtype, mesh, names, conditioner)
        problem, infos = build_problem(corpus_dev, as_dev(safe, "safe"), as_dev(harmful, "harmful"), config, plan,
                                       rows=n, mesh=mesh)
        del corpus_dev
        jax.block_until_ready(problem)
        t_setup = time.perf_counter()
        out = solver_from(config)(problem, logits, progress=progress, callback=callback, rows=n,
                                  diagnose=lambda: _diagnosis(config, infos))
    t_end = time.perf_counter()
    errors = [max(e) for e, ok in zip(out.sinkhorn_error, out.sinkhorn_converged, strict=True) if not ok]
    if not out.sinkhorn_converged.any():
        raise FloatingPointError(
            f"no step's Sinkhorn solves reached the threshold {config.sinkhorn_threshold:g} (marginal errors up to"
            f" {max(errors):.1e} in all {out.n_steps} steps), so the weights would not follow the objective:"
            f" {_diagnosis(config, infos)}")
    if out.stopped:
        message = f"converged after {out.n_steps} steps ({solver_from(config).stop_rule.describe(out.last_dw)})"
    else:
        dj = abs(out.objective[-1] - out.objective[-2]) if out.n_steps > 1 else float("nan")
        message = (f"did not converge: stopped at the step limit ({out.n_steps} steps); last |dJ| = {dj:.2e},"
                   f" ||dw||_1 = {out.last_dw:.2e}")
    converged = out.stopped
    solver_problem = _solver_problems(config, infos, out)
    if solver_problem:
        if converged:
            message = "did not converge: " + message.replace("converged after", "the stopping rule was met after", 1)
        converged = False
        message += f"; {solver_problem}"
    return SOTResult(
        weights=out.weights,
        logits=out.logits,
        objective=out.objective,
        pull=out.pull,
        push=out.push,
        entropy_term=out.entropy_term,
        sinkhorn_iterations=out.sinkhorn_iterations,
        adjoint_iterations=out.adjoint_iterations,
        sinkhorn_converged=out.sinkhorn_converged,
        sinkhorn_error=out.sinkhorn_error,
        adjoint_converged=out.adjoint_converged,
        converged=converged,
        n_steps=out.n_steps,
        message=message,
        timings={
            "setup": t_setup - t0,
            "compile": out.timings["compile"],
            "optimize": out.timings["optimize"],
            "total": t_end - t0,
        },
        geometry=infos,
        config=config,
        plan=plan,
        conditioner=conditioner,
    )


def fit_conditioner(corpus: np.ndarray, safe: np.ndarray | None, harmful: np.ndarray | None, config: SOTConfig,
                    names: dict[str, str] | None = None, *, split: bool = False) -> Conditioner | None:
    """The feature conditioning of ``config.conditioning`` fitted on the sets it names (label-free;
    :mod:`sotjax.conditioning`), or None for ``raw``.

    ``split``: ``corpus`` is this process's rows of a corpus spread over several processes; the
    corpus moments are then summed over the processes (:func:`sotjax.distributed.sum_over_processes`),
    so every process fits the map one process would fit on all rows.
    """
    from sotjax import distributed  # noqa: PLC0415

    spec = config.conditioning_config
    if spec.is_identity:
        return None
    return Conditioner.fit_problem(spec, corpus if spec.fit_on == "union" else None, safe, harmful,
                                   corpus_reduce=distributed.sum_over_processes if split else None)


def _unit(x: np.ndarray, dtype: np.dtype, conditioner: Conditioner | None, key: str,
          names: dict[str, str] | None, offset: int = 0) -> np.ndarray:
    """The unit rows the cost sees: ``x`` conditioned (chunk by chunk, no extra copy) and normalised
    (:func:`~sotjax.geometry.unit_rows`); a row the conditioning sends to zero has no cosine: one line."""
    if conditioner is None:
        return unit_rows(x, dtype)
    y = unit_rows(x, dtype, transform=conditioner.transform)
    zero = ~np.any(y != 0, axis=1)
    if np.any(zero):
        name = (names or {}).get(key, key)
        raise SotjaxInputError(f"{name}: row {offset + int(np.argmax(zero))} is the zero vector after conditioning "
                               f"{conditioner.config.spec!r} (cosine undefined); use another --conditioning")
    return y


def _padded(x: np.ndarray, rows: int) -> np.ndarray:
    """``x`` with zero rows appended up to ``rows`` (no copy when there is nothing to add)."""
    if x.shape[0] == rows:
        return x
    out = np.zeros((rows, *x.shape[1:]), x.dtype)
    out[: x.shape[0]] = x
    return out


def _own_rows(corpus: np.ndarray, n_pad: int, names: dict[str, str] | None) -> tuple[int, np.ndarray]:
    """This process's rows of the corpus, ``(start, rows)``, read and validated (errors name the global
    row; every process stops together, see :func:`sotjax.distributed.raise_together`). A memory-mapped
    ``corpus`` is paged in for those rows only."""
    from sotjax import distributed  # noqa: PLC0415

    start, stop = distributed.process_row_range(corpus.shape[0], jax.process_index(), jax.process_count(),
                                                padded=n_pad)
    local = np.asarray(corpus[start:stop])
    error = None
    try:
        if local.shape[0]:  # a block of padding only has nothing to check
            _check_set((names or {}).get("corpus", "corpus"), local, offset=start)
    except SotjaxInputError as exc:
        error = exc
    distributed.raise_together(error)
    return start, local


def _process_rows(own: tuple[int, np.ndarray], n: int, n_pad: int, dtype: np.dtype, mesh,
                  names: dict[str, str] | None, conditioner: Conditioner | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """This process's block of the corpus (its validated rows ``own`` from :func:`_own_rows`) and of
    the initial logits as one global row-sharded array, conditioned and unit-normalised on the host."""
    from sotjax import distributed  # noqa: PLC0415

    start, local = own
    unit = np.zeros((0, local.shape[1]), dtype)
    error = None
    try:
        if local.shape[0]:
            unit = _unit(local, dtype, conditioner, "corpus", names, offset=start)
    except SotjaxInputError as exc:
        error = exc
    distributed.raise_together(error)
    block = n_pad // jax.process_count()
    logits = np.where(np.arange(start, start + block) < n, 0.0, -np.inf).astype(dtype)
    return (distributed.global_rows(unit, mesh, n_pad),
            distributed.global_rows(logits, mesh, n_pad))


def _solver_problems(config: SOTConfig, infos: dict[str, GeometryInfo | None], out: SOTOutput) -> str:
    """One clause naming every inner solve of the run that missed its tolerance, with what helps; ''
    when all met it."""
    parts = []
    missed = int((~out.sinkhorn_converged).sum())
    refs = [k for k, v in infos.items() if v is not None and v.reference_self_converged is False]
    if missed:
        worst = float(out.sinkhorn_error[~out.sinkhorn_converged].max())
        parts.append(f"{missed} of {out.n_steps} step(s) had a Sinkhorn solve that missed the threshold"
                     f" {config.sinkhorn_threshold:g} (largest marginal error {worst:.1e})")
    if refs:
        parts.append(f"the self-transport of the {' and '.join(refs)} reference missed the threshold")
    if parts:
        parts[-1] += f" ({_diagnosis(config, infos)})"
    capped = int((~out.adjoint_converged).sum())
    if capped:
        parts.append(f"{capped} step(s) had an adjoint solve that hit its cap of {config.adjoint_max_iterations}"
                     " iterations (raise adjoint_max_iterations or adjoint_tol in --config)")
    return "; ".join(parts)


def _diagnosis(config: SOTConfig, infos: dict[str, GeometryInfo | None]) -> str:
    r"""What actually helps when Sinkhorn solves fail at these settings (measured; :mod:`sotjax.transport`).

    The dtype's floor: the exponent :math:`(f_i + g_j - C_{ij})/\varepsilon` of a plan entry is known to
    about :math:`u_{\rm dtype} \max C / \varepsilon` (the spacing of numbers of size :math:`\max C`, over
    :math:`\varepsilon`), and the L1 marginal error cannot go much below that. Measured on the synthetic
    problem (``max C`` = 1.9, threshold 1e-4, 50 steps): float32 met the threshold in every step at
    :math:`\varepsilon = 10^{-2}` (floor 2e-5), in 92% at :math:`10^{-3}` (floor 2e-4), in 25-48% at
    :math:`10^{-4}` and in none at :math:`10^{-6}`; float64 in every step down to :math:`10^{-6}`. Kernel mode has no
    Newton fallback (:func:`sotjax.transport.solve_sinkhorn`) and underflows beyond ``MAX_KERNEL_EXPONENT``.
    """
    present = [v for v in infos.values() if v is not None]
    eps = present[0].epsilon if present else config.epsilon
    cost_max = max((v.cost_max for v in present), default=2.0)
    advice = []
    limit = MAX_KERNEL_EXPONENT[config.dtype]
    if any(not v.lse_mode and v.cost_max / v.epsilon > limit for v in present):
        advice.append(f"kernel mode stores exp(-C/epsilon), which leaves the {config.dtype} range at max C/epsilon ="
                      f" {cost_max / eps:.3g} > {limit:g}: use --lse-mode log (or auto)")
    elif any(not v.lse_mode for v in present):
        advice.append("kernel-mode solves have no Newton fallback (lse_mode auto picks kernel mode when max"
                      f" C/epsilon <= {limit:g}): use --lse-mode log")
    unit = float(np.finfo(config.dtype).eps)
    floor = unit * cost_max / eps
    if floor > config.sinkhorn_threshold:
        where = (f"{config.dtype} resolves the plan's exponent (f_i + g_j - C_ij)/epsilon only to about {floor:.1e}"
                 f" at epsilon={eps:.3g}, above the threshold {config.sinkhorn_threshold:g}")
        if config.dtype == "float32":
            advice.append(f"{where}: use --dtype float64 or a larger --epsilon (about"
                          f" {unit * cost_max / config.sinkhorn_threshold:.0e} or more)")
        else:
            advice.append(f"{where}: use a larger --epsilon or a looser --sinkhorn-threshold")
    if not advice:
        advice.append(f"epsilon={eps:.3g} is small for this cost (max {cost_max:.3g}): use a larger --epsilon")
    return "; ".join(advice)
