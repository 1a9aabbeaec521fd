r"""Label-free conditioning of embeddings (LLM hidden states) before the cosine cost.

Raw LLM hidden states are strongly anisotropic: a few "outlier" dimensions carry a large mean
and most of the variance, so they dominate every cosine and wash out the directions that separate
harmful from benign text. The standard remedies are affine maps fitted *without labels* on the
pooled data and then applied identically to every set (and to anything later scored against the
same run):

Notation: the fit sets :math:`X_1, \dots, X_K` (rows :math:`x \in \mathbb{R}^d`) are pooled with
**equal weight per set**, :math:`\pi_j = 1/K`, each row of set :math:`j` weighing
:math:`\pi_j / n_j`:

.. math::
    \mu = \sum_j \pi_j\,\bar x_j,\qquad
    \Sigma = \sum_j \frac{\pi_j}{n_j} \sum_{x\in X_j} (x-\mu)(x-\mu)^\top
    \quad\text{(population covariance, float64)}.

The transforms, always applied in this order (each one is optional):

1. **center**: :math:`x \leftarrow x - \mu`.
2. **standardize**: :math:`x \leftarrow x / \sigma` with :math:`\sigma_k = \sqrt{\Sigma_{kk}}`
   (dimensions with zero variance keep :math:`\sigma_k = 1`). Subsequent steps use
   :math:`C = D^{-1}\Sigma D^{-1}`, :math:`D = \mathrm{diag}(\sigma)` (else :math:`C = \Sigma`).
3. **remove_top = k** ("all-but-the-top", Mu & Viswanath 2018): with the eigendecomposition
   :math:`C = \sum_i \lambda_i u_i u_i^\top`, :math:`\lambda_1 \ge \dots \ge \lambda_d`,
   :math:`x \leftarrow x - \sum_{i\le k} (u_i^\top x)\,u_i`. The principal directions are always
   those of the *centred* covariance; ``all_but_the_top`` also centres (the paper's algorithm).
4. **whiten** (ZCA, with shrinkage :math:`s`): with the post-removal eigenvalues
   :math:`\lambda'_i = \lambda_i` for :math:`i > k` and :math:`0` for :math:`i \le k`,
   :math:`\tau = \sum_i \lambda'_i / d` and :math:`\tilde\lambda_i = (1-s)\lambda'_i + s\,\tau`
   (the eigenvalues of :math:`(1-s)C' + s\,(\mathrm{tr}\,C'/d)\,I`),
   :math:`x \leftarrow \sum_{i>k} \tilde\lambda_i^{-1/2} (u_i^\top x)\,u_i` (removed directions stay 0).
   With :math:`s = 0` the conditioned fit data has identity covariance on the kept directions.

Steps 3-4 are one symmetric matrix :math:`A = U\,\mathrm{diag}(g)\,U^\top` (gains :math:`g_i` = 0
for removed directions, 1 or :math:`\tilde\lambda_i^{-1/2}` otherwise), so the whole map is
:math:`y = ((x - m) / \sigma)\,A` with :math:`m = \mu` if ``center`` else 0. Note that :math:`A` is
:math:`d\times d`: for large :math:`d` its JSON form (``Conditioner.to_dict``) is large.

Why equal weight per set (``fit_on="union"``): the corpus is usually 10-1000× larger than the
reference sets; pooling rows would fit the statistics to the corpus alone, and the references (the
directions the cosine must resolve) would barely shape them. Equal set weights make the fit
independent of the set sizes (duplicating a set changes nothing) and use no labels.
``fit_on="references"`` fits on the safe and harmful sets only (the corpus, possibly contaminated,
never shapes the geometry).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from sotjax.errors import SotjaxInputError, SotjaxRuntimeError, shorten

FitOn = Literal["union", "references"]
FIT_ON: tuple[str, ...] = ("union", "references")
CHUNK_BYTES = 64 << 20  # float64 bytes of one chunk of rows


def _fail(field: str, value: Any, why: str) -> None:
    raise SotjaxInputError(f"conditioning.{field}={shorten(value)}: {why}")


@dataclasses.dataclass(frozen=True)
class ConditioningConfig:
    """Which conditioning to fit (see the module docstring for the formulas and their order).

    Attributes:
      center: subtract the pooled mean.
      standardize: divide every dimension by its pooled standard deviation.
      remove_top: number of top principal directions (of the centred covariance) removed.
      whiten: ZCA-whiten with shrinkage ``shrinkage``.
      shrinkage: :math:`s \\in [0, 1]`; whitening uses :math:`(1-s)\\Sigma + s(\\mathrm{tr}\\Sigma/d)I`.
      fit_on: ``"union"`` (corpus + safe + harmful, equal weight per set) or ``"references"``
        (safe + harmful only).
    """

    center: bool = False
    standardize: bool = False
    remove_top: int = 0
    whiten: bool = False
    shrinkage: float = 0.1
    fit_on: FitOn = "union"

    def __post_init__(self) -> None:
        for name in ("center", "standardize", "whiten"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be true or false")
        if isinstance(self.remove_top, bool) or not isinstance(self.remove_top, int):
            _fail("remove_top", self.remove_top, "must be an integer")
        if self.remove_top < 0:
            _fail("remove_top", self.remove_top, "must be >= 0")
        s = self.shrinkage
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            _fail("shrinkage", s, "must be a finite number")
        if not 0.0 <= s <= 1.0:
            _fail("shrinkage", s, "must be in [0, 1]")
        if self.fit_on not in FIT_ON:
            _fail("fit_on", self.fit_on, f"must be one of {', '.join(FIT_ON)}")

    @property
    def is_identity(self) -> bool:
        return not (self.center or self.standardize or self.remove_top or self.whiten)

    @classmethod
    def raw(cls) -> ConditioningConfig:
        """Paper-exact: the raw features, nothing fitted or applied."""
        return cls()

    @classmethod
    def all_but_the_top(cls, k: int = 3, fit_on: FitOn = "union") -> ConditioningConfig:
        """Mu & Viswanath (2018): centre, then remove the top ``k`` principal directions."""
        return cls(center=True, remove_top=k, fit_on=fit_on)

    @classmethod
    def parse(cls, spec: str) -> ConditioningConfig:
        """The config of a one-line spec (the ``--conditioning`` flag, ``config.json``).

        Grammar: ``raw`` or steps joined by ``+`` — ``center``, ``standardize`` (centre and divide
        by the standard deviation: z-scoring), ``scale`` (divide only), ``abtt:K`` (centre, remove
        the top ``K`` principal directions), ``whiten`` / ``whiten:S`` (centre, ZCA-whiten with shrinkage ``S``, default
        0.1) — optionally followed by ``@union`` (default) or ``@references`` (the fit sets).
        Examples: ``raw``, ``standardize``, ``abtt:3``, ``standardize+abtt:1@references``.
        :attr:`spec` is the inverse (a canonical spelling).
        """
        if not isinstance(spec, str) or not spec.strip():
            _fail("spec", spec, "must be a non-empty string such as 'raw', 'standardize' or 'abtt:3'")
        body, _, fit_on = spec.strip().partition("@")
        values: dict[str, Any] = {"fit_on": fit_on or "union"}
        if values["fit_on"] not in FIT_ON:
            _fail("spec", spec, f"the fit set after '@' must be one of {', '.join(FIT_ON)}")
        if body == "raw":
            return cls(**values)
        for step in body.split("+"):
            name, _, arg = step.strip().partition(":")
            try:
                if name == "center" and not arg:
                    values["center"] = True
                elif name == "standardize" and not arg:
                    values.update(center=True, standardize=True)
                elif name == "scale" and not arg:
                    values["standardize"] = True
                elif name == "abtt" and arg:
                    values.update(center=True, remove_top=int(arg))
                elif name == "whiten":
                    values.update(center=True, whiten=True, shrinkage=float(arg) if arg else 0.1)
                else:
                    raise ValueError(step)
            except ValueError:
                _fail("spec", spec, f"unknown step {step.strip()!r} (steps: center, scale, standardize, abtt:K, "
                                    "whiten[:S], joined by '+', or raw; then optionally @union or @references)")
        return cls(**values)

    @property
    def spec(self) -> str:
        """The canonical one-line spec (:meth:`parse` gives this config back)."""
        steps = []
        if self.center and not (self.standardize or self.remove_top or self.whiten):
            steps.append("center")
        if self.standardize:
            steps.append("standardize" if self.center else "scale")
        if self.remove_top:
            steps.append(f"abtt:{self.remove_top}")
        if self.whiten:
            steps.append(f"whiten:{self.shrinkage:g}")
        body = "+".join(steps) or "raw"
        return body if self.fit_on == "union" else f"{body}@{self.fit_on}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConditioningConfig:
        if not isinstance(data, Mapping):
            raise SotjaxInputError(f"conditioning: must be an object, got {shorten(data)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SotjaxInputError(f"conditioning: unknown field(s) {', '.join(map(str, unknown))}")
        return cls(**dict(data))


def _chunk_rows(d: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise SotjaxInputError(f"chunk_rows={shorten(chunk_rows)}: must be an integer >= 1")
        return chunk_rows
    return max(1, CHUNK_BYTES // (8 * max(d, 1)))


def _max_abs(a: Any, rows: int) -> float:
    """The largest |entry| of ``a``, ``rows`` rows at a time (inf if any entry is not finite)."""
    peak = 0.0
    for start in range(0, a.shape[0], rows):
        block = np.abs(np.asarray(a[start:start + rows], dtype=np.float64))
        if block.size:
            peak = max(peak, float(block.max()) if np.all(np.isfinite(block)) else float("inf"))
    return peak


def _check_sets(sets: Sequence[Any], split: Sequence[bool] = ()) -> tuple[list[Any], int]:
    arrays = [s if hasattr(s, "shape") and hasattr(s, "dtype") else np.asarray(s) for s in sets if s is not None]
    if not arrays:
        raise SotjaxInputError("conditioning: no set to fit on")
    d = None
    for i, a in enumerate(arrays):
        if a.ndim != 2 or (a.shape[0] == 0 and not (i < len(split) and split[i])) or a.shape[1] == 0:
            raise SotjaxInputError(f"conditioning: set {i} must be a non-empty (rows, dim) array, got shape {a.shape}")
        if d is not None and a.shape[1] != d:
            raise SotjaxInputError(f"conditioning: set {i} has dimension {a.shape[1]}, expected {d}")
        d = a.shape[1]
    assert d is not None
    return arrays, d


@dataclasses.dataclass(frozen=True)
class Conditioner:
    """A fitted conditioning ``y = ((x - mean) / scale) @ matrix`` (float64; None = not applied)."""

    config: ConditioningConfig
    dim: int
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    matrix: np.ndarray | None = None

    @classmethod
    def fit(cls, config: ConditioningConfig, sets: Sequence[np.ndarray | None],
            chunk_rows: int | None = None, *, split: Sequence[bool] = (),
            reduce: Callable[[np.ndarray], np.ndarray] | None = None) -> Conditioner:
        """Fit on exactly ``sets`` (None entries skipped), each set weighing 1/K.

        Two chunked float64 passes (means, then the centred d×d second moment): memory-mapped
        inputs are read ``chunk_rows`` rows at a time, never copied whole to float64.
        ``config.fit_on`` is not consulted here; see :meth:`fit_problem`.

        Sets split across processes (``split[i]`` true for the i-th non-None set; this process holds
        only its rows, possibly none): their row count, row sum and centred second moment are summed
        over the processes by ``reduce`` (e.g. :func:`sotjax.distributed.sum_over_processes`), so every
        process fits the same map as one process holding all rows would (up to float64 summation order).
        """
        split = [bool(f) for s, f in zip(sets, list(split) + [False] * len(sets), strict=False) if s is not None]
        if any(split) and reduce is None:
            raise ValueError("split sets need a reduce function")
        arrays, d = _check_sets(sets, split)

        def summed(i: int, x: np.ndarray) -> np.ndarray:
            return reduce(x) if split[i] and reduce is not None else x
        if config.is_identity:
            return cls(config, d)
        if config.remove_top >= d:
            _fail("remove_top", config.remove_top, f"must be < the dimension {d}")
        rows = _chunk_rows(d, chunk_rows)
        # the moments are taken of x / 2^e with 2^e near the largest |x| (exact in binary): inputs of any
        # magnitude (1e-200, 1e200) neither underflow nor overflow in the second moment; the map is then
        # expressed back in the input's units. The same e on every process (from the unsplit sets).
        unsplit = [a for i, a in enumerate(arrays) if not split[i]] or arrays
        peak = max((_max_abs(a, rows) for a in unsplit), default=0.0)
        if not np.isfinite(peak):
            raise SotjaxInputError("conditioning: the fit sets contain non-finite values")
        unit = float(np.ldexp(1.0, int(np.frexp(peak)[1]))) if peak > 0 else 1.0
        weight = 1.0 / len(arrays)
        mu = np.zeros(d)
        counts = [float(summed(i, np.asarray([a.shape[0]], np.float64))[0]) for i, a in enumerate(arrays)]
        if min(counts) == 0:
            raise SotjaxInputError("conditioning: a fit set has no rows")
        for i, a in enumerate(arrays):
            total = np.zeros(d)
            for start in range(0, a.shape[0], rows):
                total += (np.asarray(a[start:start + rows], dtype=np.float64) / unit).sum(axis=0)
            mu += weight * summed(i, total) / counts[i]
        cov = np.zeros((d, d))
        for i, a in enumerate(arrays):
            second = np.zeros((d, d))
            for start in range(0, a.shape[0], rows):
                c = np.asarray(a[start:start + rows], dtype=np.float64) / unit - mu
                second += c.T @ c
            cov += (weight / counts[i]) * summed(i, second)
        if not np.all(np.isfinite(cov)):
            raise SotjaxInputError("conditioning: the fit sets contain non-finite values")
        scale = None
        if config.standardize:
            sd = np.sqrt(np.diag(cov))
            scale = np.where(sd > 0, sd, 1.0)
            cov = cov / np.outer(scale, scale)
        matrix = None
        if config.remove_top or config.whiten:
            lam, u = np.linalg.eigh((cov + cov.T) / 2)
            lam, u = np.clip(lam[::-1], 0.0, None), u[:, ::-1]
            k = config.remove_top
            gains = np.ones(d)
            if config.whiten:
                kept = lam.copy()
                kept[:k] = 0.0
                s = float(config.shrinkage)
                shrunk = (1.0 - s) * kept + s * kept.sum() / d
                bad = shrunk[k:] <= 1e-12 * max(float(lam.max()), 1e-300)
                if np.any(bad):
                    raise SotjaxRuntimeError(
                        "conditioning: the covariance is singular, whitening needs shrinkage > 0")
                gains[k:] = 1.0 / np.sqrt(shrunk[k:])
            gains[:k] = 0.0
            matrix = (u * gains) @ u.T
        # back to the input's units: (x - unit*mu) / (unit*scale) is the same map; without standardize
        # a whitening gain scales as 1/unit (a projection does not)
        if scale is not None:
            scale = scale * unit
        elif matrix is not None and config.whiten:
            matrix = matrix / unit
        elif not 2.0 ** -60 <= unit <= 2.0 ** 60:
            # centring / all-but-the-top keep the input's units, which would leave float32's range on
            # the cast in apply(): divide by the (exact) power of two instead; the cosine cost is scale-free
            scale = np.full(d, unit)
        return cls(config, d, mu * unit if config.center else None, scale, matrix)

    @classmethod
    def fit_problem(cls, config: ConditioningConfig, corpus: np.ndarray | None, safe: np.ndarray | None,
                    harmful: np.ndarray | None, chunk_rows: int | None = None, *,
                    corpus_reduce: Callable[[np.ndarray], np.ndarray] | None = None) -> Conditioner:
        """Fit on the sets ``config.fit_on`` names: corpus+safe+harmful or safe+harmful (None skipped).

        ``corpus_reduce``: ``corpus`` holds only this process's rows and its moments are summed over
        the processes with this function (see :meth:`fit`); the references are whole on every process.
        """
        if config.fit_on == "union":
            split = [corpus_reduce is not None, False, False] if corpus is not None else [False, False]
            sets = [corpus, safe, harmful] if corpus is not None else [safe, harmful]
            return cls.fit(config, sets, chunk_rows=chunk_rows, split=split, reduce=corpus_reduce)
        return cls.fit(config, [safe, harmful], chunk_rows=chunk_rows)

    def apply(self, x: np.ndarray, chunk_rows: int | None = None) -> np.ndarray:
        """Condition ``x`` (n, dim) chunk by chunk in float64; returns a new float32 (n, dim) array."""
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise SotjaxInputError(f"conditioning: input must have shape (rows, {self.dim}), got {x.shape}")
        out = np.empty(x.shape, dtype=np.float32)
        rows = _chunk_rows(self.dim, chunk_rows)
        for start in range(0, x.shape[0], rows):
            out[start:start + rows] = self.transform(np.asarray(x[start:start + rows], dtype=np.float64))
        return out

    def transform(self, block: np.ndarray) -> np.ndarray:
        """The map on one float64 block of rows (no chunking, no cast): ``((x - mean) / scale) @ matrix``."""
        if self.mean is not None:
            block = block - self.mean
        if self.scale is not None:
            block = block / self.scale
        if self.matrix is not None:
            block = block @ self.matrix
        return block

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for config.json); :meth:`from_dict` restores it bit for bit."""

        def lst(a: np.ndarray | None) -> Any:
            return None if a is None else a.tolist()

        return {"config": self.config.to_dict(), "dim": self.dim, "mean": lst(self.mean),
                "scale": lst(self.scale), "matrix": lst(self.matrix)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Conditioner:
        if not isinstance(data, Mapping):
            raise SotjaxInputError(f"conditioner: must be an object, got {shorten(data)}")
        missing = sorted({"config", "dim", "mean", "scale", "matrix"} - set(data))
        if missing:
            raise SotjaxInputError(f"conditioner: missing field(s) {', '.join(missing)}")
        config = ConditioningConfig.from_dict(data["config"])
        d = data["dim"]
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise SotjaxInputError(f"conditioner.dim={shorten(d)}: must be an integer >= 1")

        def arr(name: str, shape: tuple[int, ...]) -> np.ndarray | None:
            value = data[name]
            if value is None:
                return None
            try:
                a = np.array(value, dtype=np.float64)
            except (TypeError, ValueError):
                raise SotjaxInputError(f"conditioner.{name}: must be a numeric array") from None
            if a.shape != shape or not np.all(np.isfinite(a)):
                raise SotjaxInputError(f"conditioner.{name}: must be a finite array of shape {shape}")
            return a

        return cls(config, d, arr("mean", (d,)), arr("scale", (d,)), arr("matrix", (d, d)))
