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
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sotjax import objective as obj
from sotjax import transport
from sotjax.config import SOTConfig
from sotjax.errors import SotjaxInputError
from sotjax.geometry import (
    MAX_KERNEL_EXPONENT,
    GeometryInfo,
    cosine_geometry,
    mean_cosine_cost,
    normalize_rows,
    unit_rows,
)
from sotjax.plan import MemoryPlan, plan_memory
from sotjax.sharding import allgather_rows, corpus_mesh, mesh_size, put_replicated, put_rows, row_sharding
from sotjax.streaming import streamed_cosine


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


def make_optimizer(kind: str, n: int | jax.Array, lr: float = 1.0, momentum: float = 0.9
                   ) -> optax.GradientTransformation:
    r"""The logits' optimiser: ``optax.chain(optax.scale(n), sgd | adam)``.

    The gradient is scaled by ``n`` (so that ``lr`` does not depend on the corpus size, see
    :class:`~sotjax.config.SOTConfig`), then SGD with heavy-ball momentum (``momentum = 0`` is plain
    SGD) or Adam. The learning rate and momentum are injected hyperparameters: they live in the
    optimiser state as arrays, so a fit with another ``lr`` or ``momentum`` reuses the compiled step.
    """
    if kind == "adam":
        inner = optax.inject_hyperparams(optax.adam)(learning_rate=lr)
    else:
        inner = optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=momentum)
    return optax.chain(optax.scale(n), inner)  # n may be traced (a new n in the same bucket: no recompile)


def settings_from(config: SOTConfig) -> transport.SinkhornSettings:
    return transport.SinkhornSettings(
        threshold=config.sinkhorn_threshold,
        max_iterations=config.sinkhorn_max_iterations,
        adjoint_tol=config.adjoint_tol,
        adjoint_max_iterations=config.adjoint_max_iterations,
    )


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
    """The plan of this fit (:func:`sotjax.plan.plan_memory`): dense when it fits the budget, else
    streamed; one-line error when nothing fits or the divergence loss would need streaming."""
    refs = tuple(int(x.shape[0]) for x in (safe, harmful) if x is not None)
    plan = plan_memory(int(corpus.shape[0]), refs, int(corpus.shape[1]), dtype=config.dtype, loss=config.loss,
                       budget_bytes=config.memory_budget, kind=config.plan, devices=devices)
    if plan.kind == "stream" and config.loss == "divergence":
        raise SotjaxInputError(
            f"--plan: the divergence loss has no streamed plan yet (its corpus x corpus term) and the dense plan "
            f"does not fit ({plan.reason}); use --loss transport or regularized, or raise --memory-budget")
    return plan


def build_problem(
    corpus: jax.Array, safe: jax.Array | None, harmful: jax.Array | None, config: SOTConfig,
    plan: MemoryPlan | None = None, *, rows: int | None = None, mesh=None,
) -> tuple[obj.PushPullProblem, dict[str, GeometryInfo | None]]:
    """Normalise once and build the fixed geometries (and divergence constants).

    With a streamed ``plan`` the corpus-reference geometries are
    :class:`~sotjax.streaming.StreamedCosine` (row blocks of ``plan.block_rows``, nothing ``n x m``
    stored); their :class:`GeometryInfo` has ``cost_max`` NaN (not computed: it would cost a pass).

    One absolute epsilon serves every OT term. With ``relative_epsilon`` it is ``config.epsilon``
    times the mean cosine cost between the corpus and the (present) references pooled, so that the
    three terms of a Sinkhorn divergence share it as they must.

    ``rows``: the real corpus rows when ``corpus`` is padded with zero rows (zero mass; the statistics
    of :class:`GeometryInfo` and the relative epsilon are taken over the real rows only). ``mesh``:
    the device mesh the corpus rows are split over (:mod:`sotjax.sharding`), or None.
    """
    x = normalize_rows(corpus)
    rows = int(x.shape[0]) if rows is None else int(rows)
    settings = settings_from(config)
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
        geometries of the divergence stay dense), else dense."""
        if plan is not None and plan.kind == "stream":
            info = GeometryInfo(epsilon=eps, lse_mode=True, cost_max=float("nan"),
                                cost_mean=mean_cosine_cost(x[:rows], y))
            return streamed_cosine(x, y, int(plan.block_rows or 1), eps, mesh), info
        return geometry_of(x, y)

    infos: dict[str, GeometryInfo | None] = {"safe": None, "harmful": None}
    refs: dict[str, obj.Reference | None] = {"safe": None, "harmful": None}
    divergence = config.loss == "divergence"
    for side, y in units.items():
        geom, info = corpus_geometry(y)
        m = y.shape[0]
        b = put_replicated(np.full((m,), 1.0 / m, dtype=x.dtype), mesh)
        ot_bb = put_replicated(np.zeros((), x.dtype), mesh)
        if divergence:
            ot_bb, bb_converged = _reference_self_transport(geometry_of(y, y)[0], b, settings)
            info = dataclasses.replace(info, reference_self_converged=bool(bb_converged))
        refs[side] = obj.Reference(geom, b, ot_bb)
        infos[side] = info
    corpus_geom = geometry_of(x, x)[0] if divergence else None
    return obj.PushPullProblem(refs["safe"], refs["harmful"], corpus_geom), infos


@functools.partial(jax.jit, static_argnames=("settings",))
def _reference_self_transport(geom, b, settings: transport.SinkhornSettings) -> tuple[jax.Array, jax.Array]:
    """The divergence's constant OT_eps(b, b) and whether its solve met the threshold (compiled once)."""
    value, _, solve = transport.self_transport(geom, b, jnp.zeros_like(b), settings)
    return value, solve.converged


def initial_warm_start(problem: obj.PushPullProblem, n: int, dtype) -> obj.WarmStart:
    def zeros(ref):
        return None if ref is None else transport.zero_potentials(n, ref.b.shape[0], dtype)

    self_pot = jnp.zeros((n,), dtype) if problem.corpus_geom is not None else None
    return obj.WarmStart(zeros(problem.safe), zeros(problem.harmful), self_pot)


@functools.partial(jax.jit, static_argnames=("loss", "optimizer", "settings", "rows"))
def _step(logits, opt_state, warm, problem, lam, entropy, n, *, loss: str, optimizer: str,
          settings: transport.SinkhornSettings, rows=None):
    """One optimiser step. Only what changes the program is static (the loss, the optimiser kind,
    the inner solvers' settings, the row sharding, and the padded shapes); lambda, tau, epsilon (a
    geometry leaf), the real corpus size ``n``, the learning rate and momentum (optimiser state) are
    traced, so sweeping them, or a new ``n`` in the same size bucket, never recompiles.

    ``rows`` (a :class:`~jax.sharding.NamedSharding` or None) pins every length-``n_padded`` vector
    of the carried state to the row sharding, so that the next step sees the same layouts."""
    ev = obj.evaluate(logits, problem, warm, lam=lam, entropy=entropy, loss=loss, settings=settings)
    updates, opt_state = make_optimizer(optimizer, n).update(ev.grad_logits, opt_state, logits)
    logits = optax.apply_updates(logits, updates)
    if rows is not None:
        logits, opt_state, warm_out = _constrain_rows((logits, opt_state, ev.warm), logits.shape[0], rows)
        ev = ev._replace(warm=warm_out)
    return logits, opt_state, ev


def _constrain_rows(tree, n_rows: int, sharding):
    """Row-shard every 1-D leaf of length ``n_rows`` (the corpus axis)."""
    def pin(leaf):
        if getattr(leaf, "ndim", 0) == 1 and leaf.shape[0] == n_rows:
            return jax.lax.with_sharding_constraint(leaf, sharding)
        return leaf

    return jax.tree.map(pin, tree)


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

    with _precision(config.dtype) as dtype:
        np_dtype = np.dtype(config.dtype)

        def as_dev(x: np.ndarray | None) -> jax.Array | None:
            return None if x is None else put_replicated(unit_rows(x, np_dtype), mesh)

        # padding: zero rows of zero mass, logit -inf (softmax weight exactly 0, gradient 0)
        if processes == 1:
            corpus_dev = put_rows(_padded(unit_rows(corpus, np_dtype), n_pad), mesh)
            logits = put_rows(np.where(np.arange(n_pad) < n, 0.0, -np.inf).astype(np_dtype), mesh)
        else:
            corpus_dev, logits = _process_rows(corpus, n_pad, np_dtype, mesh, names)
        problem, infos = build_problem(corpus_dev, as_dev(safe), as_dev(harmful), config, plan, rows=n, mesh=mesh)
        del corpus_dev
        rows = row_sharding(mesh)
        warm = initial_warm_start(problem, n_pad, dtype)
        opt_state = make_optimizer(config.optimizer, n, config.lr, config.momentum).init(logits)
        if rows is not None:
            warm, opt_state = _constrain_rows_host((warm, opt_state), n_pad, rows)
        traced = {"lam": jnp.asarray(config.lam, dtype), "entropy": jnp.asarray(config.entropy, dtype),
                  "n": jnp.asarray(n, dtype)}
        static = {"loss": config.loss, "optimizer": config.optimizer, "settings": settings_from(config),
                  "rows": rows}
        jax.block_until_ready(problem)
        t_setup = time.perf_counter()

        trace: dict[str, list] = {k: [] for k in ("objective", "pull", "push", "entropy", "sk", "adj", "ok", "err",
                                                  "adj_ok")}
        prev_logits = logits
        converged = False
        message = ""
        t_first = t_setup
        bar = _progress_bar(config.steps, progress)
        try:
            for step in range(config.steps):
                logits, opt_state, ev = _step(logits, opt_state, warm, problem, **traced, **static)
                warm = ev.warm
                # only scalars come to the host (the row vectors may span processes)
                ev = jax.device_get(ev._replace(warm=None, grad_logits=None))
                dw_dev, finite_dev = _weight_change(logits, prev_logits)
                prev_logits = logits
                if step == 0:
                    t_first = time.perf_counter()
                trace["objective"].append(float(ev.objective))
                trace["pull"].append(float(ev.pull.value))
                trace["push"].append(float(ev.push.value))
                trace["entropy"].append(float(ev.entropy_term))
                trace["sk"].append((int(ev.pull.sinkhorn_iterations), int(ev.push.sinkhorn_iterations)))
                trace["adj"].append((int(ev.pull.adjoint_iterations), int(ev.push.adjoint_iterations)))
                trace["ok"].append(bool(ev.pull.sinkhorn_converged) and bool(ev.push.sinkhorn_converged))
                trace["err"].append((float(ev.pull.sinkhorn_error), float(ev.push.sinkhorn_error)))
                trace["adj_ok"].append(bool(ev.pull.adjoint_converged) and bool(ev.push.adjoint_converged))
                if not (np.isfinite(trace["objective"][-1]) and bool(finite_dev)):
                    raise FloatingPointError(
                        f"failed at step {step + 1}: the objective or the weights are not finite"
                        f" ({_diagnosis(config, infos)})")
                dw = float(dw_dev)
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
        final_logits = allgather_rows(logits).astype(np.float64)[:n]
        weights = allgather_rows(jax.nn.softmax(logits)).astype(np.float64)[:n]
    t_end = time.perf_counter()
    if not any(trace["ok"]):
        worst = max(max(e) for e in trace["err"])
        raise FloatingPointError(
            f"no step's Sinkhorn solves reached the threshold {config.sinkhorn_threshold:g} (marginal errors up to"
            f" {worst:.1e} in all {len(trace['ok'])} steps), so the weights would not follow the objective:"
            f" {_diagnosis(config, infos)}")
    solver_problem = _solver_problems(config, infos, trace)
    if solver_problem:
        if converged:
            message = "did not converge: " + message.replace("converged after", "the stopping rule was met after", 1)
        converged = False
        message += f"; {solver_problem}"
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
        sinkhorn_error=np.asarray(trace["err"], dtype=np.float64).reshape(-1, 2),
        adjoint_converged=np.asarray(trace["adj_ok"], dtype=bool),
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
        plan=plan,
    )


@jax.jit
def _weight_change(logits: jax.Array, previous: jax.Array) -> tuple[jax.Array, jax.Array]:
    r""":math:`\|w - w_{\rm prev}\|_1` of the softmax weights and whether ``w`` is finite, on the device."""
    w = jax.nn.softmax(logits)
    return jnp.sum(jnp.abs(w - jax.nn.softmax(previous))), jnp.all(jnp.isfinite(w))


def _padded(x: np.ndarray, rows: int) -> np.ndarray:
    """``x`` with zero rows appended up to ``rows`` (no copy when there is nothing to add)."""
    if x.shape[0] == rows:
        return x
    out = np.zeros((rows, *x.shape[1:]), x.dtype)
    out[: x.shape[0]] = x
    return out


def _process_rows(corpus: np.ndarray, n_pad: int, dtype: np.dtype, mesh, names: dict[str, str] | None
                  ) -> tuple[jax.Array, jax.Array]:
    """This process's block of the corpus (and of the initial logits) as one global row-sharded array.

    Each process reads only its rows (a memory-mapped ``corpus`` is paged in for those rows only),
    validates them (errors name the global row; every process stops together, see
    :func:`sotjax.distributed.raise_together`) and unit-normalises them on the host.
    """
    from sotjax import distributed  # noqa: PLC0415

    n = corpus.shape[0]
    start, stop = distributed.process_row_range(n, jax.process_index(), jax.process_count(), padded=n_pad)
    local = np.asarray(corpus[start:stop])
    error = None
    try:
        if local.shape[0]:  # a block of padding only has nothing to check
            _check_set((names or {}).get("corpus", "corpus"), local, offset=start)
    except SotjaxInputError as exc:
        error = exc
    distributed.raise_together(error)
    block = n_pad // jax.process_count()
    logits = np.where(np.arange(start, start + block) < n, 0.0, -np.inf).astype(dtype)
    return (distributed.global_rows(unit_rows(local, dtype), mesh, n_pad),
            distributed.global_rows(logits, mesh, n_pad))


def _constrain_rows_host(tree, n_rows: int, sharding):
    """Device placement of the carried state before the first step: row vectors split (the
    counterpart of :func:`_constrain_rows`), everything else replicated."""
    rep = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())

    def place(leaf):
        if getattr(leaf, "ndim", 0) == 1 and leaf.shape[0] == n_rows:
            return jax.device_put(leaf, sharding)
        return jax.device_put(leaf, rep)

    return jax.tree.map(place, tree)


def _solver_problems(config: SOTConfig, infos: dict[str, GeometryInfo | None], trace: dict[str, list]) -> str:
    """One clause naming every inner solve of the run that missed its tolerance, with what helps; ''
    when all met it."""
    parts = []
    missed = trace["ok"].count(False)
    refs = [k for k, v in infos.items() if v is not None and v.reference_self_converged is False]
    if missed:
        worst = max(max(e) for e, ok in zip(trace["err"], trace["ok"], strict=True) if not ok)
        parts.append(f"{missed} of {len(trace['ok'])} step(s) had a Sinkhorn solve that missed the threshold"
                     f" {config.sinkhorn_threshold:g} (largest marginal error {worst:.1e})")
    if refs:
        parts.append(f"the self-transport of the {' and '.join(refs)} reference missed the threshold")
    if parts:
        parts[-1] += f" ({_diagnosis(config, infos)})"
    capped = trace["adj_ok"].count(False)
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
