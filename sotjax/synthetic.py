r"""Synthetic push-pull problems with known labels (for tests, benchmarks and sanity checks).

Points are :math:`\mathrm{unit}(\mu + \sigma\,\xi/\sqrt d)` with :math:`\xi \sim N(0, I_d)` around
two unit centres: a *task* centre (benign corpus samples and the safe anchor) and a *harmful*
centre (injected corpus samples and the harmful reference). ``shared`` adds a common direction to
every centre, which mimics the anisotropy of LLM hidden states (all cosines positive).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticProblem:
    corpus: np.ndarray
    safe: np.ndarray
    harmful: np.ndarray
    is_harmful: np.ndarray  # (n,) bool labels of the corpus


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def make_problem(
    n: int = 1000,
    n_safe: int = 50,
    n_harmful: int = 500,
    dim: int = 48,
    harmful_fraction: float = 0.1,
    noise: float = 1.0,
    shared: float = 1.0,
    seed: int = 0,
    dtype=np.float32,
) -> SyntheticProblem:
    """A corpus with ``round(harmful_fraction * n)`` harmful samples placed last."""
    rng = np.random.default_rng(seed)
    common = _unit(rng.normal(size=dim))
    task = _unit(rng.normal(size=dim) + shared * common)
    harm = _unit(rng.normal(size=dim) + shared * common)

    def around(centre: np.ndarray, k: int) -> np.ndarray:
        return _unit(centre + noise * rng.normal(size=(k, dim)) / np.sqrt(dim) * np.sqrt(dim) / 4).astype(dtype)

    n_bad = int(round(harmful_fraction * n))
    corpus = np.concatenate([around(task, n - n_bad), around(harm, n_bad)])
    labels = np.zeros(n, dtype=bool)
    labels[n - n_bad:] = True
    return SyntheticProblem(corpus, around(task, n_safe), around(harm, n_harmful), labels)
