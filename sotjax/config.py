"""Configuration of SOT Stage 1 (weight learning) and of the Top-K selection.

Every field is validated when the dataclass is built, so a config that exists is a
config that runs. Invalid values raise :class:`~sotjax.errors.SotjaxInputError`
naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

from sotjax.errors import SotjaxInputError, shorten

Loss = Literal["transport", "regularized", "divergence"]
Optimizer = Literal["sgd", "adam"]
Reweight = Literal["exp", "softmax"]
DType = Literal["float32", "float64"]
LseMode = Literal["auto", "log", "kernel"]

LOSSES: tuple[str, ...] = ("transport", "regularized", "divergence")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
REWEIGHTS: tuple[str, ...] = ("exp", "softmax")
DTYPES: tuple[str, ...] = ("float32", "float64")
LSE_MODES: tuple[str, ...] = ("auto", "log", "kernel")
PlanChoice = Literal["auto", "dense", "dense-bf16", "stream"]
PLANS: tuple[str, ...] = ("auto", "dense", "dense-bf16", "stream")
#: the feature conditioning applied before the cosine cost (a :meth:`ConditioningConfig.parse` spec):
#: per-dimension z-scoring fitted label-free on the three sets, each weighing 1/3. Chosen on development
#: splits by a rule fixed before the evaluation splits were run (benchmarks/quality_protocol.py,
#: benchmarks/RESULTS_quality.md); ``"raw"`` (:meth:`SOTConfig.paper`) is the paper's features as they are
DEFAULT_CONDITIONING = "standardize"


def _fail(field: str, value: Any, why: str) -> None:
    raise SotjaxInputError(f"{field}={shorten(value)}: {why}")


def _check_real(field: str, value: Any, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(field, value, "must be a finite number")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        _fail(field, value, f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        _fail(field, value, f"must be {'<' if hi_open else '<='} {hi}")


def _check_int(field: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field, value, "must be an integer")
    if value < lo:
        _fail(field, value, f"must be >= {lo}")


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(field, value, f"must be one of {', '.join(choices)}")


@dataclasses.dataclass(frozen=True)
class GeometryConfig:
    """How the features become costs and how the OT problems are stored and solved: the feature
    conditioning (:mod:`sotjax.conditioning`), epsilon, Sinkhorn mode, dtype, memory plan."""

    conditioning: str = DEFAULT_CONDITIONING
    epsilon: float = 0.1
    relative_epsilon: bool = False
    lse_mode: LseMode = "auto"
    dtype: DType = "float32"
    plan: PlanChoice = "auto"
    memory_budget: int | None = None
    devices: int = 0

    def __post_init__(self) -> None:
        from sotjax.conditioning import ConditioningConfig

        ConditioningConfig.parse(self.conditioning)
        _check_real("epsilon", self.epsilon, 0.0, lo_open=True)
        if not isinstance(self.relative_epsilon, bool):
            _fail("relative_epsilon", self.relative_epsilon, "must be true or false")
        _check_choice("lse_mode", self.lse_mode, LSE_MODES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("plan", self.plan, PLANS)
        if self.memory_budget is not None:
            _check_int("memory_budget", self.memory_budget, 1)
        _check_int("devices", self.devices, 0)


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """The push-pull objective: lambda, the OT loss, the entropy weight tau."""

    lam: float = 0.5
    loss: Loss = "transport"
    entropy: float = 0.0

    def __post_init__(self) -> None:
        _check_real("lam", self.lam, 0.0, 1.0)
        _check_choice("loss", self.loss, LOSSES)
        _check_real("entropy", self.entropy, 0.0)


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """The optimiser of the logits, its stopping rule, and the inner solvers' tolerances."""

    optimizer: Optimizer = "sgd"
    lr: float = 1.0
    momentum: float = 0.9
    steps: int = 50
    objective_tol: float = 1e-6
    weight_tol: float = 1e-4
    sinkhorn_threshold: float = 1e-4
    sinkhorn_max_iterations: int = 2000
    adjoint_tol: float = 1e-5
    adjoint_max_iterations: int = 500

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_real("lr", self.lr, 0.0, lo_open=True)
        _check_real("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        _check_int("steps", self.steps, 1)
        _check_real("objective_tol", self.objective_tol, 0.0)
        _check_real("weight_tol", self.weight_tol, 0.0)
        _check_real("sinkhorn_threshold", self.sinkhorn_threshold, 0.0, lo_open=True)
        _check_int("sinkhorn_max_iterations", self.sinkhorn_max_iterations, 1)
        _check_real("adjoint_tol", self.adjoint_tol, 0.0, lo_open=True)
        _check_int("adjoint_max_iterations", self.adjoint_max_iterations, 1)


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """Top-K and the training weights of the kept samples."""

    keep: float = 0.8
    keep_count: int | None = None
    reweight: Reweight = "exp"

    def __post_init__(self) -> None:
        _check_real("keep", self.keep, 0.0, 1.0, lo_open=True)
        if self.keep_count is not None:
            _check_int("keep_count", self.keep_count, 1)
        _check_choice("reweight", self.reweight, REWEIGHTS)


#: one line of help per field (the command line's flags are generated from these and the layers)
FIELD_HELP: dict[str, str] = {
    "conditioning": "label-free feature conditioning before the cosine cost: raw (paper) | center | standardize | "
                    "abtt:K | whiten[:S], joined by +, optionally @references (see README, Feature conditioning)",
    "epsilon": "entropic regularisation epsilon (cost units)",
    "relative_epsilon": "multiply epsilon by the mean corpus-reference cost",
    "lse_mode": "Sinkhorn updates: auto | log (log-sum-exp) | kernel (precomputed kernel)",
    "dtype": "float32 or float64",
    "plan": "memory plan: auto (fastest that fits) | dense | dense-bf16 | stream (see README, Large corpora)",
    "memory_budget": "memory the plan may use, e.g. 8GiB (default: 60%% of available memory)",
    "devices": "devices the corpus rows are split over (0 = all devices of every process)",
    "lam": "push weight lambda in [0, 1] (0 = pull only, 1 = push only)",
    "loss": "transport (paper Eq. 6) | regularized (OT_eps) | divergence (Sinkhorn divergence)",
    "entropy": "weight tau of KL(w || uniform); > 0 gives a unique interior optimum",
    "optimizer": "optimiser of the logits",
    "lr": "learning rate (size-independent: the logit gradient is multiplied by n)",
    "momentum": "SGD momentum",
    "steps": "maximum optimiser steps",
    "objective_tol": "stop when |dJ| <= tol * max(1, |J|) (and the weight rule holds); 0 disables",
    "weight_tol": "stop when ||dw||_1 <= tol (and the objective rule holds); 0 disables",
    "sinkhorn_threshold": "L1 marginal error at which a Sinkhorn solve stops",
    "sinkhorn_max_iterations": "cap on the iterations of one Sinkhorn solve",
    "adjoint_tol": "relative residual of the CG solve in the transport loss's gradient",
    "adjoint_max_iterations": "cap on the CG iterations of one gradient",
    "keep": "fraction of the corpus kept by Top-K",
    "keep_count": "number of samples kept by Top-K (instead of --keep)",
    "reweight": "training-weight reading of Eq. 7: exp | softmax",
}

LAYERS: dict[str, type] = {"geometry": GeometryConfig, "objective": ObjectiveConfig, "solver": SolverConfig,
                           "selection": SelectionConfig}


@dataclasses.dataclass(frozen=True)
class SOTConfig:
    r"""Stage 1 of SOT: learn ``w = softmax(logits)`` by minimising

    .. math::
        J(w) = (1-\lambda)\,L_\varepsilon(w, Q_{\rm safe}) - \lambda\,L_\varepsilon(w, M_{\rm harm})
               + \tau\,\mathrm{KL}(w \,\|\, \mathbf{1}/n)

    on the cosine cost :math:`C_{ij} = 1 - \langle z_i, z_j\rangle/(\|z_i\|\|z_j\|) \in [0, 2]`.

    Attributes:
      lam: :math:`\lambda \in [0, 1]`; 0 = pull only (safe anchor), 1 = push only (harmful).
      conditioning: a label-free affine map fitted on the sets and applied to every feature before
        the cosine cost (a :meth:`~sotjax.conditioning.ConditioningConfig.parse` spec such as
        ``"standardize"`` or ``"abtt:3"``; ``"raw"`` = the paper's features as they are).
      epsilon: entropic regularisation :math:`\varepsilon > 0`, absolute (cost units) unless
        ``relative_epsilon``; the paper uses 0.1 on the cosine cost.
      relative_epsilon: if True, :math:`\varepsilon` is multiplied by the mean cosine cost between the
        corpus and the pooled references (one value shared by every OT term).
      loss: which :math:`L_\varepsilon` (see :mod:`sotjax.transport`):
        ``"transport"`` :math:`\langle T^\star, C\rangle` of the entropic plan (paper Eq. 6),
        ``"regularized"`` the entropic OT value :math:`\mathrm{OT}_\varepsilon`,
        ``"divergence"`` the Sinkhorn divergence :math:`S_\varepsilon`.
      entropy: :math:`\tau \ge 0`, weight of the KL-to-uniform term; > 0 makes the minimiser unique
        and interior (the unregularised minimiser collapses onto a few samples).
      optimizer: ``"sgd"`` (heavy-ball momentum ``momentum``) or ``"adam"``, on the logits.
      lr: learning rate. The logit gradient is multiplied by ``n`` (the corpus size), so that at
        uniform weights one plain SGD step moves logit ``i`` by ``lr * (mean(g) - g_i)`` with
        ``g = dJ/dw``: ``lr`` does not depend on the corpus size.
      momentum: SGD momentum (ignored by Adam).
      steps: maximum number of optimiser steps.
      objective_tol: stop when ``|J_t - J_{t-1}| <= objective_tol * max(1, |J_t|)`` and
      weight_tol: ``||w_t - w_{t-1}||_1 <= weight_tol`` both hold. ``0`` disables stopping early.
      sinkhorn_threshold: marginal error (L1) at which a Sinkhorn solve stops.
      sinkhorn_max_iterations: cap on iterations of one Sinkhorn solve.
      lse_mode: ``"log"`` (log-sum-exp updates), ``"kernel"`` (scalings and a precomputed kernel
        matrix, a matrix-vector product per update) or ``"auto"`` (kernel when
        ``max(C)/epsilon`` is small enough for the dtype not to underflow, else log).
      adjoint_tol, adjoint_max_iterations: tolerance/cap of the conjugate-gradient solve in the
        implicit gradient of the ``"transport"`` loss.
      dtype: ``"float32"`` (default) or ``"float64"``.
      keep: fraction of the corpus kept by Top-K (used when ``keep_count`` is None).
      keep_count: absolute number kept by Top-K; overrides ``keep``.
      reweight: reading of the paper's Eq. 7 for the training weights of the kept samples:
        ``"exp"`` ``w'_i ∝ exp(w_i)`` on the simplex weights (robust to collapse; default) or
        ``"softmax"`` the softmax of the kept logits (``w_i`` restricted to Top-K, renormalised).
    """

    lam: float = 0.5
    conditioning: str = DEFAULT_CONDITIONING
    epsilon: float = 0.1
    relative_epsilon: bool = False
    loss: Loss = "transport"
    entropy: float = 0.0
    optimizer: Optimizer = "sgd"
    lr: float = 1.0
    momentum: float = 0.9
    steps: int = 50
    objective_tol: float = 1e-6
    weight_tol: float = 1e-4
    sinkhorn_threshold: float = 1e-4
    sinkhorn_max_iterations: int = 2000
    lse_mode: LseMode = "auto"
    adjoint_tol: float = 1e-5
    adjoint_max_iterations: int = 500
    dtype: DType = "float32"
    keep: float = 0.8
    keep_count: int | None = None
    reweight: Reweight = "exp"
    plan: PlanChoice = "auto"
    memory_budget: int | None = None
    devices: int = 0

    def __post_init__(self) -> None:
        for layer in LAYERS.values():  # each layer validates its own fields
            layer(**{f.name: getattr(self, f.name) for f in dataclasses.fields(layer)})

    @property
    def geometry(self) -> GeometryConfig:
        return self._layer(GeometryConfig)

    @property
    def objective(self) -> ObjectiveConfig:
        return self._layer(ObjectiveConfig)

    @property
    def solver(self) -> SolverConfig:
        return self._layer(SolverConfig)

    @property
    def selection(self) -> SelectionConfig:
        return self._layer(SelectionConfig)

    def _layer(self, layer):
        return layer(**{f.name: getattr(self, f.name) for f in dataclasses.fields(layer)})

    @classmethod
    def from_layers(cls, geometry: GeometryConfig | None = None, objective: ObjectiveConfig | None = None,
                    solver: SolverConfig | None = None, selection: SelectionConfig | None = None) -> SOTConfig:
        """The flat config of the given layer configs (defaults for the others)."""
        values: dict[str, Any] = {}
        for part in (geometry, objective, solver, selection):
            if part is not None:
                values.update(dataclasses.asdict(part))
        return cls(**values)

    @classmethod
    def paper(cls) -> SOTConfig:
        """The paper's exact Stage 1: raw features (no conditioning), lambda 0.5, epsilon 0.1 on the cosine
        cost, transport loss, Top-80%. The default differs only in its conditioning (``standardize``)."""
        return cls(conditioning="raw")

    @classmethod
    def entropic(cls, tau: float = 0.03) -> SOTConfig:
        """Unique interior optimum: the KL-to-uniform term with weight ``tau`` (about 150 SGD steps)."""
        return cls(entropy=tau, steps=300)

    @property
    def conditioning_config(self):
        """:attr:`conditioning` parsed (a :class:`~sotjax.conditioning.ConditioningConfig`)."""
        from sotjax.conditioning import ConditioningConfig

        return ConditioningConfig.parse(self.conditioning)

    def replace(self, **changes: Any) -> SOTConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> SOTConfig:
        """Build from a mapping (e.g. a YAML file); unknown keys are an error naming ``source``."""
        for key in values:
            if not isinstance(key, str):
                raise SotjaxInputError(f"{source}: field names must be strings, got {shorten(key)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k if len(k) <= 80 else k[:79] + "…" for k in sorted(set(values) - known)][:10]
        if unknown:
            raise SotjaxInputError(f"{source}: unknown field(s) {', '.join(unknown)}")
        return cls(**dict(values))
