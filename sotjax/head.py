r"""The amortised, differentiable weight head (DRIFT): ``w = softmax(g_ψ(z) + r)``.

Instead of one free logit per corpus row, the logits are a function of the row's feature,

.. math::
    \theta_i = g_\psi(z_i) + r_i,\qquad w = \mathrm{softmax}(\theta),\qquad
    \min_{\psi, r}\; J(w) + \tfrac{\lambda_r}{2n}\,\|r\|^2
        + \tfrac{\lambda_\psi}{2}\sum_\ell \|W_\ell\|_F^2 / s_\ell,

with :math:`J` the push-pull objective of :mod:`sotjax.objective` on the same problem pytree
(:class:`~sotjax.problem.PushPullProblem`), :math:`z_i` exactly what the cost sees (the conditioned,
unit-normalised rows) and :math:`g_\psi` a linear map or a one-hidden-layer MLP (flax.nnx,
:class:`WeightHead`). The optional residual logits :math:`r` (``HeadConfig.residual`` :math:`= \lambda_r > 0`)
let a row deviate from the head at an L2 price; :math:`\lambda_r` is per sample (the penalty is
:math:`\lambda_r/2` times the *mean* of :math:`r_i^2`) so that, like the learning rate, it does not depend on
:math:`n`. Residuals exist only for the training rows: unseen rows are scored by :math:`g_\psi` alone.
The optional ridge penalty :math:`\lambda_\psi` (``HeadConfig.decay``) on the head's weight matrices (not its
biases) keeps :math:`g_\psi` smooth where it could otherwise interpolate a collapsed free-logit solution
(``d`` ≥ the number of training rows). Each layer's term is divided by its gradient scale :math:`s_\ell`
(below; :math:`s = d` for a layer on the unit rows), so that after the scaling a step shrinks the weights by
``lr * decay`` whatever the dimension (stable for ``lr * decay < 2``; a plain :math:`\lambda\|W\|^2` would
diverge once ``lr * decay * d`` passed it).

Gradient (a Stackelberg gradient, as in DRIFT): :func:`sotjax.objective.evaluate` gives
:math:`\nabla_\theta J` with the Sinkhorn potentials at their fixed point (implicit differentiation, no
unrolling); it is pulled back to :math:`\psi` with ``jax.vjp`` of the head:
:math:`\nabla_\psi J = (\partial\theta/\partial\psi)^\top \nabla_\theta J`.

Optimiser: the solver's (:func:`sotjax.solver.make_optimizer`, ``sgd`` with momentum or ``adam``). The free
solver scales the logit gradient by :math:`n`; here each layer's gradient is scaled by
``fan_in / mean ||input||^2`` (``d`` for a layer on the unit rows) and the residuals' by :math:`n`. With
isotropic features this makes a step move the logits as the free solver's step projected on what the head
can represent, so the same ``lr`` serves both; with one-hot features (``d = n``) a linear head takes exactly
the free solver's steps (tested).

Scoring unseen data (:meth:`TrainedHead.score`): the run's conditioner, unit-normalisation, the head — in
chunks, O(n d), no OT solve. The head is stored in the run directory as ``head.safetensors`` +
``head.json`` (:meth:`sotjax.rundir.RunWriter.write_head`, :meth:`sotjax.rundir.RunDir.read_head`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sotjax import learn, transport
from sotjax import objective as obj
from sotjax.conditioning import Conditioner
from sotjax.config import SOTConfig
from sotjax.errors import SotjaxInputError
from sotjax.problem import PushPullProblem, initial_warm_start
from sotjax.solver import SOTOutput, StopRule, drive, make_optimizer

HEAD_KINDS = ("linear", "mlp")
#: rows per chunk when scoring (a chunk of 65536 x 576 float32 features is 150 MB)
DEFAULT_CHUNK_ROWS = 65536


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The weight head: ``kind`` (``linear`` | ``mlp``), ``hidden`` units of the MLP, the residual
    penalty ``residual`` (:math:`\\lambda_r`; 0 = no residual logits), an output ``bias`` (a constant
    shift: softmax ignores it), the init ``seed`` (the MLP's hidden layer) and the ridge penalty ``decay``
    (:math:`\\lambda_\\psi` on the weight matrices, per layer divided by its gradient scale; 0 = none)."""

    kind: str = "linear"
    hidden: int = 64
    residual: float = 0.0
    bias: bool = True
    seed: int = 0
    decay: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise SotjaxInputError(f"--head: must be one of {', '.join(HEAD_KINDS)}, got {self.kind!r}")
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden < 1:
            raise SotjaxInputError(f"--head-hidden: must be an integer >= 1, got {self.hidden!r}")
        r = self.residual
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not np.isfinite(r) or r < 0:
            raise SotjaxInputError(f"--head-residual: must be a finite number >= 0, got {r!r}")
        c = self.decay
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not np.isfinite(c) or c < 0:
            raise SotjaxInputError(f"--head-decay: must be a finite number >= 0, got {c!r}")


class WeightHead(nnx.Module):
    """``g_ψ``: unit rows ``(n, dim)`` -> logits ``(n,)``. Linear: ``z @ W + b``; MLP:
    ``gelu(z @ W1 + b1) @ w2 + b2``. The output layer starts at zero (uniform weights, as the free
    solver starts); the hidden layer at N(0, 1) entries, so that on unit rows its pre-activations are N(0, 1)."""

    def __init__(self, dim: int, kind: str = "linear", hidden: int = 64, *, bias: bool = True,
                 dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None) -> None:
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        zeros = nnx.initializers.zeros
        self.kind = kind
        width = dim
        if kind == "mlp":
            self.hidden = nnx.Linear(dim, hidden, kernel_init=nnx.initializers.normal(1.0), bias_init=zeros,
                                     dtype=dtype, param_dtype=dtype, rngs=rngs)
            width = hidden
        self.out = nnx.Linear(width, 1, use_bias=bias, kernel_init=zeros, bias_init=zeros, dtype=dtype,
                              param_dtype=dtype, rngs=rngs)

    def features(self, z: jax.Array) -> jax.Array:
        """The output layer's input."""
        return nnx.gelu(self.hidden(z)) if self.kind == "mlp" else z

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.out(self.features(z))[..., 0]


def make_head(dim: int, config: HeadConfig = HeadConfig(), dtype: Any = jnp.float32) -> WeightHead:
    """A fresh :class:`WeightHead` of ``config`` on ``dim``-dimensional features."""
    return WeightHead(dim, config.kind, config.hidden, bias=config.bias, dtype=dtype, rngs=nnx.Rngs(config.seed))


def param_shapes(kind: str, dim: int, hidden: int, bias: bool) -> dict[str, tuple[int, ...]]:
    """The parameter names (``/``-joined nnx paths) and shapes of a head; what ``head.safetensors`` holds."""
    width = hidden if kind == "mlp" else dim
    shapes: dict[str, tuple[int, ...]] = {}
    if kind == "mlp":
        shapes.update({"hidden/kernel": (dim, hidden), "hidden/bias": (hidden,)})
    shapes["out/kernel"] = (width, 1)
    if bias:
        shapes["out/bias"] = (1,)
    return shapes


def head_arrays(head: WeightHead) -> dict[str, np.ndarray]:
    """The head's parameters as host arrays by name (:func:`param_shapes`)."""
    _, state = nnx.split(head, nnx.Param)
    return {"/".join(map(str, path)): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(state)}


def load_head(config: HeadConfig, dim: int, arrays: Mapping[str, np.ndarray], dtype: Any = jnp.float32
              ) -> WeightHead:
    """A :class:`WeightHead` of ``config`` holding ``arrays`` (names and shapes checked by the caller)."""
    head = make_head(dim, config, dtype)
    graphdef, state = nnx.split(head, nnx.Param)
    flat = {path: jnp.asarray(arrays["/".join(map(str, path))], dtype) for path, _ in nnx.to_flat_state(state)}
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ------------------------------------------------------------------------------------------ the solver
class HeadState(NamedTuple):
    """What one step carries to the next: head parameters, residual logits (None without), optimiser
    state, warm-start potentials, the current logits (``-inf`` on padding rows) and the per-leaf
    gradient scales (constant)."""

    params: Any
    residual: jax.Array | None
    opt_state: Any
    warm: obj.WarmStart
    logits: jax.Array
    scales: Any


class HeadOutput(NamedTuple):
    """What :class:`HeadSolver` returns: the trained head, the residual logits of the real rows (None
    without), and the solve's traces (:class:`~sotjax.solver.SOTOutput`: ``logits`` are
    ``g_ψ(z) + r`` of the real rows)."""

    head: WeightHead
    residual: np.ndarray | None
    solve: SOTOutput

    @property
    def logits(self) -> np.ndarray:
        return self.solve.logits

    @property
    def weights(self) -> np.ndarray:
        return self.solve.weights

    @property
    def n_steps(self) -> int:
        return self.solve.n_steps

    @property
    def converged(self) -> bool:
        return self.solve.converged


def _valid(problem: PushPullProblem) -> jax.Array:
    return jnp.arange(problem.padded_rows) < problem.n


def _logits(graphdef: Any, params: Any, residual: jax.Array | None, features: jax.Array, valid: jax.Array
            ) -> jax.Array:
    theta = nnx.merge(graphdef, params)(features)
    if residual is not None:
        theta = theta + residual
    return jnp.where(valid, theta, -jnp.inf)


def evaluate_head(
    params: Any, residual: jax.Array | None, problem: PushPullProblem, features: jax.Array, warm: obj.WarmStart,
    *, graphdef: Any, settings: transport.SinkhornSettings, residual_weight: float | jax.Array = 0.0,
    decay_weight: float | jax.Array = 0.0, scales: Any = None,
) -> tuple[obj.Evaluation, jax.Array, tuple[Any, jax.Array | None]]:
    r"""Objective (with the residual and ridge penalties), the logits and :math:`(\nabla_\psi, \nabla_r)` of it (pure).

    :math:`\nabla_\theta J` from :func:`sotjax.objective.evaluate` (potentials at their fixed point),
    pulled back through the head with ``jax.vjp``."""
    valid = _valid(problem)
    logits, pullback = jax.vjp(lambda p, r: _logits(graphdef, p, r, features, valid), params, residual)
    ev = obj.evaluate(logits, problem, warm, lam=problem.lam, entropy=problem.entropy, loss=problem.loss,
                      settings=settings)
    grad_params, grad_residual = pullback(ev.grad_logits)
    if residual is not None:
        n = problem.n
        ev = ev._replace(objective=ev.objective + 0.5 * residual_weight * jnp.sum(residual * residual) / n)
        grad_residual = grad_residual + residual_weight * residual / n
    # ridge on the weight matrices: + decay/2 * sum ||W||^2 / s, gradient + decay * W / s (biases untouched;
    # s = the layer's gradient scale, 1 where ``scales`` is None)
    is_kernel = jax.tree_util.tree_map_with_path(lambda path, _: "kernel" in jax.tree_util.keystr(path), params)
    scales = jax.tree.map(lambda _: 1.0, params) if scales is None else scales
    ridge = sum((jnp.sum(w * w) / s for w, s, k in zip(jax.tree.leaves(params), jax.tree.leaves(scales),
                                                       jax.tree.leaves(is_kernel), strict=True) if k),
                jnp.zeros((), logits.dtype))
    ev = ev._replace(objective=ev.objective + 0.5 * decay_weight * ridge)
    grad_params = jax.tree.map(lambda g, w, s, k: g + decay_weight * w / s if k else g, grad_params, params, scales,
                               is_kernel)
    return ev, logits, (grad_params, grad_residual)


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "settings"))
def _update(state: HeadState, problem: PushPullProblem, features: jax.Array, residual_weight: jax.Array,
            decay_weight: jax.Array, *, graphdef: Any, optimizer: str,
            settings: transport.SinkhornSettings) -> tuple[HeadState, obj.Evaluation]:
    """One optimiser step of the head (pure)."""
    ev, _, (g_params, g_residual) = evaluate_head(state.params, state.residual, problem, features, state.warm,
                                                  graphdef=graphdef, settings=settings,
                                                  residual_weight=residual_weight, decay_weight=decay_weight,
                                                  scales=state.scales)
    grads = (jax.tree.map(jnp.multiply, g_params, state.scales),
             None if g_residual is None else g_residual * problem.n)
    updates, opt_state = make_optimizer(optimizer, 1).update(grads, state.opt_state, (state.params, state.residual))
    params, residual = optax.apply_updates((state.params, state.residual), updates)
    assert ev.warm is not None
    logits = _logits(graphdef, params, residual, features, _valid(problem))
    return HeadState(params, residual, opt_state, ev.warm, logits, state.scales), ev._replace(warm=None,
                                                                                            grad_logits=None)


@dataclasses.dataclass(frozen=True)
class HeadSolver:
    """Learns a :class:`WeightHead` (and residual logits) on a :class:`~sotjax.problem.PushPullProblem`.

    Attributes: as :class:`~sotjax.solver.SOTSolver` (``optimizer``, ``lr``, ``momentum``, ``stop_rule``,
    ``settings``), plus ``residual`` (:math:`\\lambda_r`; 0: no residual logits) and ``decay``
    (:math:`\\lambda_\\psi`; 0: no ridge penalty).
    """

    optimizer: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.9
    stop_rule: StopRule = StopRule()
    settings: transport.SinkhornSettings = transport.SinkhornSettings()
    residual: float = 0.0
    decay: float = 0.0

    def init(self, problem: PushPullProblem, head: WeightHead, features: jax.Array) -> tuple[Any, HeadState]:
        """``(graphdef, state)`` before the first step; the gradient scales are measured on ``features``."""
        graphdef, params = nnx.split(head, nnx.Param)
        dtype = features.dtype
        n = problem.n
        valid = _valid(problem)
        scale_of = {"hidden": float(features.shape[1]), "out": float(features.shape[1])}
        if head.kind == "mlp":
            h = head.features(features)
            mean_sq = jnp.sum(jnp.where(valid[:, None], h * h, 0.0)) / n
            scale_of["out"] = float(h.shape[1] / jnp.maximum(mean_sq, jnp.finfo(dtype).tiny))
        scales = jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.asarray(scale_of[str(getattr(path[0], "key", path[0]))], dtype), params)
        residual = jnp.zeros((problem.padded_rows,), dtype) if self.residual > 0 else None
        opt_state = make_optimizer(self.optimizer, 1, self.lr, self.momentum).init((params, residual))
        warm = initial_warm_start(problem, problem.padded_rows, dtype)
        logits = _logits(graphdef, params, residual, features, valid)
        return graphdef, HeadState(params, residual, opt_state, warm, logits, scales)

    def __call__(
        self, problem: PushPullProblem, head: WeightHead, features: jax.Array, *, progress: bool = False,
        callback: Callable[[int, dict[str, float]], None] | None = None, diagnose: Callable[[], str] = lambda: "",
        rows: int | None = None,
    ) -> HeadOutput:
        """Run steps until the stop rule (the host driver of :func:`sotjax.solver.drive`). ``features``:
        the padded unit rows the problem was built from (length ``problem.padded_rows``)."""
        graphdef, state = self.init(problem, head, features)
        weight = jnp.asarray(self.residual, features.dtype)
        decay = jnp.asarray(self.decay, features.dtype)  # traced: another decay, the same program
        last = [state]

        def step(s: HeadState) -> tuple[HeadState, obj.Evaluation]:
            new, ev = _update(s, problem, features, weight, decay, graphdef=graphdef, optimizer=self.optimizer,
                              settings=self.settings)
            last[0] = new
            return new, ev

        out = drive(state, step, self.stop_rule, progress=progress, callback=callback, diagnose=diagnose, rows=rows)
        final = last[0]
        residual = None if final.residual is None else np.asarray(final.residual, np.float64)[:rows]
        return HeadOutput(nnx.merge(graphdef, final.params), residual, out)


# ------------------------------------------------------------------------------------------ fit and score
@dataclasses.dataclass(frozen=True, eq=False)
class TrainedHead:
    """A trained head with what scoring needs: its config, feature dimension, parameters (host arrays by
    name), the run's feature conditioning (None: raw), the compute dtype and the feature provenance."""

    config: HeadConfig
    dim: int
    arrays: dict[str, np.ndarray]
    conditioner: Conditioner | None = None
    dtype: str = "float32"
    features: dict[str, Any] | None = None

    @functools.cached_property
    def module(self) -> WeightHead:
        with learn._precision(self.dtype) as dtype:
            return load_head(self.config, self.dim, self.arrays, dtype)

    def meta(self) -> dict[str, Any]:
        """The content of ``head.json`` (without ``schema``)."""
        return {"kind": self.config.kind, "dim": self.dim,
                "hidden": self.config.hidden if self.config.kind == "mlp" else None, "bias": self.config.bias,
                "residual": self.config.residual, "decay": self.config.decay, "seed": self.config.seed,
                "dtype": self.dtype,
                "conditioning": "raw" if self.conditioner is None else self.conditioner.config.spec,
                "features": self.features or {},
                "params": {k: list(v.shape) for k, v in sorted(self.arrays.items())}}

    def iter_scores(self, x: Any, chunk_rows: int = DEFAULT_CHUNK_ROWS, name: str = "corpus"
                    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, logits)`` per chunk of ``chunk_rows`` rows of ``x`` (an array or a memory map: read a
        chunk at a time): rows checked (finite, non-zero), conditioned, unit-normalised, through the head."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            got = x.shape[1] if x.ndim == 2 else x.shape
            raise SotjaxInputError(f"{name}: embedding dimension {got} does not match the head's feature "
                                   f"dimension {self.dim}")
        chunk_rows = max(1, min(int(chunk_rows), int(x.shape[0]) or 1))
        with learn._precision(self.dtype) as dtype:
            graphdef, params = nnx.split(self.module, nnx.Param)
            np_dtype = np.dtype(self.dtype)
            for start in range(0, x.shape[0], chunk_rows):
                block = np.asarray(x[start:start + chunk_rows])
                learn._check_set(name, block, offset=start)
                rows = block.shape[0]
                # the unit rows the cost saw in training: the same function (sotjax.learn) on these rows
                unit = learn._unit(block, np_dtype, self.conditioner, "corpus", {"corpus": name}, offset=start)
                z = learn._padded(unit, chunk_rows)
                yield start, np.asarray(_score(graphdef, params, jnp.asarray(z, dtype)), np.float64)[:rows]

    def score(self, x: Any, chunk_rows: int = DEFAULT_CHUNK_ROWS, name: str = "corpus") -> np.ndarray:
        """The head's logits of the rows of ``x`` (raw features, as given to :func:`fit_head`), ``(n,)`` float64."""
        parts = [s for _, s in self.iter_scores(x, chunk_rows, name)]
        return np.concatenate(parts) if parts else np.zeros((0,))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef: Any, params: Any, z: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(z)


@dataclasses.dataclass(frozen=True)
class HeadFit:
    """What :func:`fit_head` returns: the Stage-1 result (same type as :func:`sotjax.fit`'s; its logits are
    ``g_ψ(z) + r``), the trained head, and the residual logits (None without)."""

    result: learn.SOTResult
    head: TrainedHead
    residual: np.ndarray | None = None


_DEFAULT_CONFIG = SOTConfig()


def fit_head(
    corpus: np.ndarray, safe: np.ndarray | None, harmful: np.ndarray | None, config: SOTConfig = _DEFAULT_CONFIG,
    head: HeadConfig = HeadConfig(), *, progress: bool = False,
    callback: Callable[[int, dict[str, float]], None] | None = None, names: dict[str, str] | None = None,
    features: dict[str, Any] | None = None,
) -> HeadFit:
    """:func:`sotjax.fit` with the logits given by a weight head (module docstring): the same validation,
    conditioning, memory plan, padding and problem; the :class:`HeadSolver` in place of the free solver.
    ``features``: the feature provenance to record with the head (``head.json``). One process only."""
    t0 = time.perf_counter()
    if jax.process_count() > 1:
        raise SotjaxInputError("--head: a run of several processes cannot train a weight head yet; fit it on a "
                               "sample in one process, then score the rest with `sotjax score`")
    corpus = np.asarray(corpus)
    safe = None if safe is None or config.lam == 1.0 else np.asarray(safe)
    harmful = None if harmful is None or config.lam == 0.0 else np.asarray(harmful)
    if config.lam < 1.0 and safe is None:
        raise SotjaxInputError("safe: a safe anchor set is required when lam < 1")
    if config.lam > 0.0 and harmful is None:
        raise SotjaxInputError("harmful: a harmful reference set is required when lam > 0")
    n = corpus.shape[0]
    learn.validate_inputs(corpus, safe, harmful, names)
    conditioner = learn.fit_conditioner(corpus, safe, harmful, config, names)
    from sotjax.sharding import corpus_mesh, mesh_size, put_replicated, put_rows

    mesh = corpus_mesh(config.devices)
    plan = learn.memory_plan(corpus, safe, harmful, config, devices=mesh_size(mesh))
    n_pad = max(plan.padded_rows, n)
    with learn._precision(config.dtype) as dtype:
        np_dtype = np.dtype(config.dtype)

        def as_dev(x: np.ndarray | None, key: str) -> jax.Array | None:
            return None if x is None else put_replicated(learn._unit(x, np_dtype, conditioner, key, names), mesh)

        # the unit rows the cost sees (sotjax.learn: conditioned, normalised), zero padding rows
        corpus_dev = put_rows(learn._padded(learn._unit(corpus, np_dtype, conditioner, "corpus", names), n_pad),
                              mesh)
        problem, infos = learn.build_problem(corpus_dev, as_dev(safe, "safe"), as_dev(harmful, "harmful"), config,
                                             plan, rows=n, mesh=mesh)
        jax.block_until_ready(problem)
        t_setup = time.perf_counter()
        sot = learn.solver_from(config)
        solver = HeadSolver(sot.optimizer, sot.lr, sot.momentum, sot.stop_rule, sot.settings, head.residual,
                            head.decay)
        out = solver(problem, make_head(corpus.shape[1], head, dtype), corpus_dev, progress=progress,
                     callback=callback, diagnose=lambda: learn._diagnosis(config, infos), rows=n)
        arrays = head_arrays(out.head)
    t_end = time.perf_counter()
    result = _result(out.solve, config, infos, plan, conditioner,
                     {"setup": t_setup - t0, "compile": out.solve.timings["compile"],
                      "optimize": out.solve.timings["optimize"], "total": t_end - t0})
    trained = TrainedHead(head, int(corpus.shape[1]), arrays, conditioner, config.dtype, features)
    return HeadFit(result, trained, out.residual)


def _result(out: SOTOutput, config: SOTConfig, infos: dict, plan: Any, conditioner: Conditioner | None,
            timings: dict[str, float]) -> learn.SOTResult:
    """The :class:`~sotjax.learn.SOTResult` of a solve, with :func:`sotjax.fit`'s message and checks."""
    if not out.sinkhorn_converged.any():
        errors = [max(e) for e in out.sinkhorn_error]
        raise FloatingPointError(
            f"no step's Sinkhorn solves reached the threshold {config.sinkhorn_threshold:g} (marginal errors up to"
            f" {max(errors):.1e} in all {out.n_steps} steps), so the weights would not follow the objective:"
            f" {learn._diagnosis(config, infos)}")
    if out.stopped:
        message = f"converged after {out.n_steps} steps ({learn.solver_from(config).stop_rule.describe(out.last_dw)})"
    else:
        dj = abs(out.objective[-1] - out.objective[-2]) if out.n_steps > 1 else float("nan")
        message = (f"did not converge: stopped at the step limit ({out.n_steps} steps); last |dJ| = {dj:.2e},"
                   f" ||dw||_1 = {out.last_dw:.2e}")
    converged = out.stopped
    problem_text = learn._solver_problems(config, infos, out)
    if problem_text:
        if converged:
            message = "did not converge: " + message.replace("converged after", "the stopping rule was met after", 1)
        converged = False
        message += f"; {problem_text}"
    return learn.SOTResult(
        weights=out.weights, logits=out.logits, objective=out.objective, pull=out.pull, push=out.push,
        entropy_term=out.entropy_term, sinkhorn_iterations=out.sinkhorn_iterations,
        adjoint_iterations=out.adjoint_iterations, sinkhorn_converged=out.sinkhorn_converged,
        sinkhorn_error=out.sinkhorn_error, adjoint_converged=out.adjoint_converged, converged=converged,
        n_steps=out.n_steps, message=message, timings=timings, geometry=infos, config=config, plan=plan,
        conditioner=conditioner)


def feature_provenance(corpus_info: Mapping[str, Any]) -> dict[str, Any]:
    """What produced the corpus features, to store with the head: the input ``kind`` (``embeddings`` |
    ``text``), the text-feature settings and model fingerprint of a text input, or, for an embedding
    ``.npy`` written by ``sotjax embed``, the model and fingerprint of its ``<stem>.meta.json``."""
    out: dict[str, Any] = {"kind": corpus_info.get("kind")}
    if corpus_info.get("features") is not None:
        out["features"] = corpus_info["features"]
    fingerprint = corpus_info.get("model_fingerprint")
    if fingerprint is None and corpus_info.get("path"):
        meta = embedding_meta(corpus_info["path"])
        fingerprint = meta.get("model_fingerprint")
        if meta.get("model") is not None:
            out["model"] = meta["model"]
    if fingerprint is not None:
        out["model_fingerprint"] = fingerprint
    return out


def embedding_meta(path: str | Any) -> dict[str, Any]:
    """The ``<stem>.meta.json`` that ``sotjax embed`` writes beside ``<stem>.npy`` (empty when there is
    none or it is not a readable JSON object)."""
    import json
    from pathlib import Path

    p = Path(path)
    if p.suffix.lower() != ".npy":
        return {}
    meta = p.with_name(p.name[: -len(".npy")] + ".meta.json")
    try:
        if not meta.is_file() or meta.stat().st_size > (1 << 20):
            return {}
        value = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def from_files(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], conditioner: Conditioner | None,
               where: str) -> TrainedHead:
    """A :class:`TrainedHead` from ``head.json`` (``meta``) and ``head.safetensors`` (``arrays``) of a run,
    checked: known kind, integer dimensions, every parameter present with its shape and finite, the
    conditioner's dimension. One :class:`SotjaxInputError` line naming ``where`` otherwise."""
    def integer(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SotjaxInputError(f"{where}: field '{key}' must be an integer >= 1, got {value!r}")
        return value

    kind = meta.get("kind")
    if kind not in HEAD_KINDS:
        raise SotjaxInputError(f"{where}: field 'kind' must be one of {', '.join(HEAD_KINDS)}, got {kind!r}")
    dim = integer("dim", meta.get("dim"))
    hidden = integer("hidden", meta.get("hidden")) if kind == "mlp" else 64
    bias = meta.get("bias", True)
    if not isinstance(bias, bool):
        raise SotjaxInputError(f"{where}: field 'bias' must be true or false, got {bias!r}")
    dtype = meta.get("dtype", "float32")
    if dtype not in ("float32", "float64"):
        raise SotjaxInputError(f"{where}: field 'dtype' must be float32 or float64, got {dtype!r}")
    residual = meta.get("residual", 0.0)
    try:
        decay = meta.get("decay", 0.0)
        config = HeadConfig(kind, hidden, residual if isinstance(residual, (int, float)) else -1.0, bias,
                            decay=decay if isinstance(decay, (int, float)) else -1.0)
    except SotjaxInputError as err:
        raise SotjaxInputError(f"{where}: {err}") from None
    shapes = param_shapes(kind, dim, hidden, bias)
    extra = sorted(set(arrays) - set(shapes))
    if extra:
        raise SotjaxInputError(f"{where}: tensor {extra[0]!r} is not a parameter of a {kind} head")
    for name, shape in shapes.items():
        if name not in arrays:
            raise SotjaxInputError(f"{where}: tensor {name!r} is missing")
        a = arrays[name]
        if tuple(a.shape) != shape:
            raise SotjaxInputError(f"{where}: tensor {name!r} has shape {tuple(a.shape)}, expected {shape} "
                                   f"(a {kind} head on {dim}-dimensional features)")
        if not np.issubdtype(a.dtype, np.floating) or not np.all(np.isfinite(a)):
            raise SotjaxInputError(f"{where}: tensor {name!r} must hold finite floats")
    if conditioner is not None and conditioner.dim != dim:
        raise SotjaxInputError(f"{where}: the head's feature dimension {dim} does not match the run's "
                               f"conditioning ({conditioner.dim})")
    features = meta.get("features")
    return TrainedHead(config, dim, {k: np.asarray(v) for k, v in arrays.items()}, conditioner, dtype,
                       features if isinstance(features, dict) else None)
