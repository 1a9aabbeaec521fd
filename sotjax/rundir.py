"""Run directories: the one owner of what a sotjax run leaves on disk — its schema, writers and reader.

``sotjax weigh`` and ``sotjax demo`` write a run directory; ``sotjax eval`` reads one and adds its
results to it; ``sotjax finetune`` writes a directory of kind ``finetune`` with the same marker.
They are one object with one versioned schema, :data:`SCHEMA` (``"sotjax.run/2"``), written by
:func:`writing_run` / :class:`RunWriter` (and :func:`write_eval`) and read back by :func:`read_run`
into a :class:`RunDir` with named fields. Nothing else in sotjax writes or parses
these files.

Schema ``sotjax.run/2`` (kinds: W = ``weigh``, D = ``demo``, E = added by ``sotjax eval``):

=====================  =====  ==================================================================
file                   kinds  content
=====================  =====  ==================================================================
``.sotjax-run``        W D    the marker (below)
``weights.parquet``    W D    one row per corpus sample, in input order: ``id`` (string),
                              ``weight`` (float64, simplex: sums to 1), ``logit`` (float64;
                              ``weight = softmax(logit)``), ``rank`` (int64, 0 = best),
                              ``selected`` (bool, the Top-K), ``train_weight`` (float64; mean 1
                              over the kept rows, 0 elsewhere)
``selected_ids.npy``   W D    ids of the kept rows, best first (1-D unicode array, no pickle)
``conditioning.npz``   W D    only when the features were conditioned (``sot.conditioning`` is not
                              ``raw``): the fitted map ``y = ((x - mean) / scale) @ matrix`` as
                              float64 arrays ``mean``, ``scale``, ``matrix`` (each absent when not
                              applied) and ``config`` (its JSON, a 0-d string; no pickle); apply it
                              to anything later scored against the run
``head.safetensors``   W      only with ``--head``: the weight head's parameters (:mod:`sotjax.head`;
                              tensors named ``out/kernel``, ``out/bias``, ``hidden/kernel``, ``hidden/bias``)
``head.json``          W      only with ``--head``: ``schema``, ``kind`` (linear/mlp), ``dim``, ``hidden``,
                              ``bias``, ``residual``, ``decay``, ``dtype``, ``conditioning`` (its spec),
                              ``features``
                              (the corpus's feature provenance: kind, text-feature settings, model
                              fingerprint when known), ``params`` (name -> shape); read back by
                              :meth:`RunDir.read_head`, scored by ``sotjax score``
``config.json``        W D    object: ``schema``; ``sot`` (every :class:`~sotjax.SOTConfig` field,
                              ``keep`` included); ``versions`` (python, platform, packages).
                              W adds ``inputs`` (``corpus``/``safe``/``harmful``/``ids``: ``path``,
                              ``sha256``, ``kind``, text-feature settings) and ``command`` (argv).
                              D adds ``benchmark`` (the ``BenchmarkConfig``: ``seed``, sizes, …),
                              ``features``, ``feature_options`` (``layer``, ``pooling``), ``keep`` and
                              ``sotjax_version``
``stats.json``         W D    object: ``schema``; ``shapes`` (``n``, ``dim``, ``n_safe``,
                              ``n_harmful``); ``converged``, ``message``, ``n_steps``; per-step
                              ``objective``, ``pull``, ``push``, ``entropy_term``;
                              ``sinkhorn_iterations``, ``adjoint_iterations``, ``sinkhorn_error``
                              (each ``{"safe": [...], "harmful": [...]}``),
                              ``sinkhorn_all_converged``, ``adjoint_converged``; ``geometry``;
                              ``timings_s``; ``selection`` (``keep_count``, ``reweight``, ``ess``,
                              the other reading's ESS, ``ess_weights``, ``max_weight``); ``plan``
                              (the memory plan); ``devices``; ``versions``. D adds ``benchmark``
                              (counts), ``kept_harmful`` and ``timings_s.embed``
``metrics.json``       D      ``{method: {auroc, auprc, harmful_retention, benign_recall,
                              harmful_weight_mass, failed, seconds}}`` for SOT, its one-sided
                              ablations and the baselines (no ``schema`` key: every key is a method)
``benchmark.parquet``  D      one row per benchmark record: ``set`` (corpus/safe/harmful), ``id``,
                              ``label`` (benign/harmful), ``source``, ``hash`` (all strings)
``embeddings.npz``     D      ``corpus``, ``safe``, ``harmful``: 2-D float32 features (no pickle)
``report.html``        D      the self-contained HTML report (:mod:`sotjax.report`)
``weights.png``        D      weight distributions, benign vs harmful
``traces.png``         D      objective / pull / push per step (when the fit took a step)
``projection.png``     D      2-D PCA of the features
``eval.json``          E      object: ``schema``, ``keep``, ``k``, ``metrics`` (as in
                              ``metrics.json``), ``notes``
``eval.md``            E      the metrics table printed by ``sotjax eval``
=====================  =====  ==================================================================

Kind ``finetune`` (``sotjax finetune --out DIR``, :mod:`sotjax.finetune.outdir`) uses the same
marker and schema but its own files, listed as ``/``-separated relative paths: ``config.json``
(settings, inputs with sha256, model fingerprint, versions), ``stats.json`` (losses per step,
steps, tokens, timings), ``adapter/adapter_model.safetensors`` and ``adapter/adapter_config.json``
(PEFT LoRA adapter), and unless ``--no-merged`` ``merged/model.safetensors``,
``merged/config.json`` and the tokenizer files :data:`TOKENIZER_FILES` under ``merged/``. It holds
no ``weights.parquet``: :func:`read_run` refuses it with one line. A fine-tune directory replaces
only a fine-tune directory, and a weigh/demo run never replaces one.

Kind ``audit`` (``sotjax audit --out DIR``, :mod:`sotjax.audit`) uses the same marker and schema
with its own three files: ``links.parquet`` (one row per link: ``id_a``, ``set_a``, ``id_b``,
``set_b`` strings, ``cosine`` float32, ``row_a``, ``row_b`` int64 row numbers, ``mutual`` bool;
sets are ``corpus``/``safe``/``harmful``), ``summary.json`` (``schema``; ``threshold``,
``top_k``, ``backend``, ``shapes``, ``pairs`` (counts per set pair), ``duplicates`` (clusters and
their size histogram), ``leakage``, ``warnings``, ``timings_s``, ``inputs``, ``command``,
``versions``) and ``audit.html`` (counts only). It holds no ``weights.parquet``; an audit
directory replaces only an audit directory, and no other kind replaces one.

No file holds prompt or response text: rows are named by id (and a hash).

The marker :data:`MARKER` is written last, by sotjax itself, and lists the files the writer
wrote::

    {"format": "sotjax-run", "version": 2, "schema": "sotjax.run/2", "kind": "weigh",
     "files": ["config.json", "selected_ids.npy", "stats.json", "weights.parquet"]}

``files`` holds plain file names, or (kind ``finetune``) relative paths such as
``adapter/adapter_config.json``; ``..``, an absolute path or the marker itself is refused.

``config.json`` and ``stats.json`` (and ``eval.json``) carry the same ``"schema"``. Older runs stay
readable: a version-1 marker (``{"format", "version": 1, "kind", "files"}``, no ``schema`` key in
the JSON files) reads as schema ``sotjax.run/1``; a directory without a marker (copied by hand,
written before markers) is read leniently — only ``weights.parquet`` (``id``, ``weight``,
``logit``) is required — but sotjax never writes into it. A marker from a newer sotjax
(version > :data:`FORMAT_VERSION`) is refused. Every problem reading a run is one
:class:`SotjaxInputError` line naming the file and the field/column.

Replacing a run. A run directory is written atomically (a staging directory renamed into place,
:mod:`sotjax.atomic`). An existing ``--out`` is replaced only when sotjax can prove it wrote it:
the marker is present and valid, and the directory holds nothing but the files the marker lists
(plus the files ``sotjax eval`` adds, :data:`ADDED_LATER`). Anything else — a user's folder that
happens to hold a ``stats.json``, a directory with the inputs in it, a subdirectory — is refused
with one line and left untouched. The current directory, any of its ancestors, and any directory
that holds an input are never replaced, whatever they contain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sotjax.atomic import OWNER_FILE, atomic_directory, write_text_atomic
from sotjax.errors import SotjaxInputError, SotjaxRuntimeError, shorten

MARKER = ".sotjax-run"
FORMAT = "sotjax-run"
#: the version of the run-directory schema this sotjax writes (and the newest it reads)
FORMAT_VERSION = 2
SCHEMA_NAME = "sotjax.run"
#: the schema this sotjax writes, in the marker and in ``config.json`` / ``stats.json`` / ``eval.json``
SCHEMA = f"{SCHEMA_NAME}/{FORMAT_VERSION}"
KINDS = ("weigh", "demo", "finetune", "audit")
#: the kinds that hold ``weights.parquet`` (what :func:`read_run` reads)
WEIGHT_KINDS = ("weigh", "demo")

WEIGHTS = "weights.parquet"
SELECTED_IDS = "selected_ids.npy"
CONFIG = "config.json"
STATS = "stats.json"
METRICS = "metrics.json"
BENCHMARK = "benchmark.parquet"
EMBEDDINGS = "embeddings.npz"
CONDITIONING = "conditioning.npz"
CONDITIONER_ARRAYS = ("mean", "scale", "matrix")
HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"
#: largest ``head.safetensors`` read back (an MLP head on 4096-d features with 4096 hidden units: 64 MiB)
MAX_HEAD_BYTES = 1 << 30
REPORT = "report.html"
EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"
REPORT_FIGURES = ("weights.png", "traces.png", "projection.png")
#: files of a ``finetune`` directory (``sotjax finetune``, :mod:`sotjax.finetune.export`): relative paths
ADAPTER_WEIGHTS = "adapter/adapter_model.safetensors"
ADAPTER_CONFIG = "adapter/adapter_config.json"
MERGED_WEIGHTS = "merged/model.safetensors"
MERGED_CONFIG = "merged/config.json"
#: tokenizer files a merged checkpoint may hold (copied from the base checkpoint, or rebuilt)
#: files of an ``audit`` directory (``sotjax audit``, :mod:`sotjax.audit`)
LINKS = "links.parquet"
AUDIT_SUMMARY = "summary.json"
AUDIT_HTML = "audit.html"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")

WEIGHTS_COLUMNS = ("id", "weight", "logit", "rank", "selected", "train_weight")
BENCHMARK_COLUMNS = ("set", "id", "label", "source", "hash")
EMBEDDING_SETS = ("corpus", "safe", "harmful")

#: files ``sotjax eval`` writes into an existing run directory (not listed in the marker)
ADDED_LATER = (EVAL_JSON, EVAL_MD)
#: every file a run of each kind may hold (besides the marker and :data:`ADDED_LATER`)
FILES: dict[str, tuple[str, ...]] = {
    "weigh": (WEIGHTS, SELECTED_IDS, CONFIG, STATS, CONDITIONING, HEAD_WEIGHTS, HEAD_CONFIG),
    "demo": (WEIGHTS, SELECTED_IDS, CONFIG, STATS, METRICS, BENCHMARK, EMBEDDINGS, REPORT, *REPORT_FIGURES,
             CONDITIONING),
    "finetune": (CONFIG, STATS, ADAPTER_WEIGHTS, ADAPTER_CONFIG, MERGED_WEIGHTS, MERGED_CONFIG,
                 *(f"merged/{name}" for name in TOKENIZER_FILES)),
    "audit": (LINKS, AUDIT_SUMMARY, AUDIT_HTML),
}
#: the files a run of each kind always holds
REQUIRED: dict[str, tuple[str, ...]] = {
    "weigh": (WEIGHTS, SELECTED_IDS, CONFIG, STATS),
    "demo": (WEIGHTS, SELECTED_IDS, CONFIG, STATS, METRICS, BENCHMARK, EMBEDDINGS, REPORT, "weights.png"),
    "finetune": (CONFIG, STATS, ADAPTER_WEIGHTS, ADAPTER_CONFIG),
    "audit": (LINKS, AUDIT_SUMMARY, AUDIT_HTML),
}
#: the kinds whose files may sit in sub-directories (``files`` lists ``/``-separated relative paths)
NESTED_KINDS = ("finetune",)
#: which existing run kinds a new run of each kind may replace (a fine-tune never replaces a weigh/demo run)
REPLACES: dict[str, tuple[str, ...]] = {"weigh": WEIGHT_KINDS, "demo": WEIGHT_KINDS, "finetune": ("finetune",),
                                         "audit": ("audit",)}
#: files ``sotjax eval`` may add, per kind
ADDED_LATER_BY_KIND: dict[str, tuple[str, ...]] = {"weigh": ADDED_LATER, "demo": ADDED_LATER, "finetune": (),
                                                   "audit": ()}
#: the marker is read only up to this size (a marker sotjax wrote is a few hundred bytes)
_MARKER_MAX_BYTES = 1 << 16
#: largest JSON file of a run read back (``stats.json`` of a very long fit is a few MB)
MAX_JSON_BYTES = 256 << 20


def schema_of(version: int) -> str:
    """The schema name of run-format ``version`` (``1`` -> ``"sotjax.run/1"``)."""
    return f"{SCHEMA_NAME}/{version}"


# ------------------------------------------------------------------------------------------ marker
def parse_marker(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The validated marker of ``run_dir``; None when there is none.

    A marker that is there but is not one sotjax wrote (unreadable, not JSON, a wrong field) is
    one :class:`SotjaxInputError` line naming the file and the field.
    """
    path = Path(run_dir) / MARKER
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        raise SotjaxInputError(f"{path}: not a regular file")
    try:
        if path.stat().st_size > _MARKER_MAX_BYTES:
            raise SotjaxInputError(f"{path}: larger than {_MARKER_MAX_BYTES} bytes (not a run marker)")
        marker = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SotjaxInputError(f"{path}: cannot be read ({err.strerror})") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SotjaxInputError(f"{path}: not valid JSON (not a run marker sotjax wrote)") from None
    if not isinstance(marker, dict):
        raise SotjaxInputError(f"{path}: expected a JSON object, got {type(marker).__name__}")
    if marker.get("format") != FORMAT:
        raise SotjaxInputError(f"{path}: field 'format' must be {FORMAT!r}, got {shorten(marker.get('format'))}")
    version = marker.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise SotjaxInputError(f"{path}: field 'version' must be a positive integer, got {shorten(version)}")
    if version > FORMAT_VERSION:
        raise SotjaxInputError(f"{path}: written by a newer sotjax (run format {version} > {FORMAT_VERSION}); "
                               "upgrade sotjax to read it")
    if version >= 2 and marker.get("schema") != schema_of(version):
        raise SotjaxInputError(f"{path}: field 'schema' must be {schema_of(version)!r}, "
                               f"got {shorten(marker.get('schema'))}")
    if marker.get("kind") not in KINDS:
        raise SotjaxInputError(f"{path}: field 'kind' must be one of {', '.join(KINDS)}, "
                               f"got {shorten(marker.get('kind'))}")
    kind = marker["kind"]
    if kind in NESTED_KINDS and version < 2:
        raise SotjaxInputError(f"{path}: a {kind} run needs run format 2 or later, got {version}")
    files = marker.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise SotjaxInputError(f"{path}: field 'files' must be a list of file names")
    for name in files:
        if not _is_file_name(name, nested=kind in NESTED_KINDS):
            what = "a relative path inside the run" if kind in NESTED_KINDS else "a file name of a run"
            raise SotjaxInputError(f"{path}: field 'files' lists {shorten(name)}, not {what}")
        if version >= 2 and name not in FILES[marker["kind"]]:
            raise SotjaxInputError(f"{path}: field 'files' lists {shorten(name)}, "
                                   f"not a file of a {marker['kind']} run ({schema_of(version)})")
    return marker


def _is_file_name(name: str, *, nested: bool) -> bool:
    """Whether ``name`` may be listed in a marker: a plain file name, or (``nested``) a ``/``-separated
    relative path whose every part is a plain name (no ``..``, no absolute path, not the marker)."""
    if not name or "\\" in name or "\0" in name or name == MARKER:
        return False
    parts = name.split("/") if nested else [name]
    return all(part and part not in (".", "..") for part in parts) and (nested or "/" not in name)


def read_marker(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed marker of ``run_dir``, or None when it is missing or not one sotjax wrote."""
    try:
        return parse_marker(run_dir)
    except SotjaxInputError:
        return None


def marker_text(kind: str, files: Iterable[str]) -> str:
    """The content of :data:`MARKER` for a run of ``kind`` holding ``files``."""
    if kind not in KINDS:
        raise ValueError(f"unknown run kind {kind!r}")
    body = {"format": FORMAT, "version": FORMAT_VERSION, "schema": SCHEMA, "kind": kind, "files": sorted(files)}
    return json.dumps(body, indent=2) + "\n"


# ------------------------------------------------------------------------- may --out be replaced?
def is_run_dir(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` is a directory sotjax wrote and nothing else has been put into."""
    return _foreign_reason(Path(run_dir)) is None


def _tree(directory: Path) -> tuple[list[str], str | None]:
    """``/``-separated relative paths of the regular files under ``directory`` (sub-directories walked,
    links not followed), or the first entry that is neither a plain file nor a plain directory."""
    files: list[str] = []
    pending = [directory]
    while pending:
        current = pending.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as err:
            return files, f"cannot be listed ({err.strerror})"
        for entry in entries:
            rel = Path(entry.path).relative_to(directory).as_posix()
            if entry.is_symlink():
                return files, f"holds {rel!r}, a symbolic link"
            if entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                files.append(rel)
            else:
                return files, f"holds {rel!r}, which is not a plain file"
    return files, None


def _foreign_reason(run_dir: Path, kind: str | None = None) -> str | None:
    """None when ``run_dir`` is a run sotjax wrote, untouched since, that a new ``kind`` run may
    replace (:data:`REPLACES`; None: a weigh or demo run); else why not, as the end of a sentence."""
    try:
        marker = parse_marker(run_dir)
    except SotjaxInputError as err:
        detail = str(err).split(": ", 1)[-1]
        return f"has an invalid {MARKER} marker: {detail}"
    if marker is None:
        return f"has no valid {MARKER} marker"
    found = str(marker["kind"])
    if found not in REPLACES[kind or "weigh"]:
        return f"is a sotjax {found} run, which a {kind or 'weigh or demo'} run does not replace"
    allowed = {MARKER, *marker["files"], *ADDED_LATER_BY_KIND[found]}
    if found in NESTED_KINDS:
        present, reason = _tree(run_dir)
        extra = sorted(set(present) - allowed)
        if extra:
            return f"holds {extra[0]!r}, which sotjax did not write there"
        return reason
    try:
        entries = list(os.scandir(run_dir))
    except OSError as err:
        return f"cannot be listed ({err.strerror})"
    for entry in entries:
        if entry.name not in allowed:
            return f"holds {entry.name!r}, which sotjax did not write there"
        if entry.is_dir(follow_symlinks=False) or entry.is_symlink():
            return f"holds {entry.name!r}, which is not a plain file"
    return None


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def check_output_dir(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                     kind: str | None = None) -> None:
    """Refuse an ``--out`` that sotjax may not replace (one line naming it); call before any work.

    Allowed: a path that does not exist yet (its parent writable), an empty directory, or a run
    directory sotjax wrote (see the module docstring) that a run of ``kind`` may replace
    (:data:`REPLACES`; without ``kind``, a weigh or demo run). Refused: a file; the current
    directory or an ancestor of it; a directory holding (at any depth) one of ``inputs``; a
    non-empty directory that is not provably sotjax's own.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown run kind {kind!r}")
    out = Path(out_dir)
    where = f"--out {out}"
    if out.is_symlink():
        raise SotjaxInputError(f"{where}: is a symbolic link; give the real directory or a new path")
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if _is_within(cwd, resolved):
        what = "the current directory" if resolved == cwd else "a parent of the current directory"
        raise SotjaxInputError(f"{where}: is {what}; sotjax replaces its output directory, give a new path")
    for item in inputs:
        if item is None:
            continue
        if _is_within(Path(item).resolve(), resolved):
            raise SotjaxInputError(f"{where}: contains the input {item}; give a new path for the output")
    if out.exists():
        if not out.is_dir():
            raise SotjaxInputError(f"{where}: exists and is not a directory")
        try:
            empty = not any(os.scandir(out))
        except OSError as err:
            raise SotjaxInputError(f"{where}: cannot be listed ({err.strerror})") from None
        if not empty:
            reason = _foreign_reason(out, kind)
            if reason is not None:
                what = {"finetune": "fine-tune directory", "audit": "audit directory"}.get(kind or "", "run directory")
                raise SotjaxInputError(
                    f"{where}: exists and is not a sotjax {what} (it {reason}); "
                    "sotjax never replaces a directory it did not write: choose another --out")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SotjaxInputError(f"{where}: cannot be created ({parent} is not a writable directory)")


# ----------------------------------------------------------------------------------------- writers
def _with_schema(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {"schema": SCHEMA, **{k: v for k, v in obj.items() if k != "schema"}}


class RunWriter:
    """The writer of each file of a run directory, inside its staging directory (see :func:`writing_run`).

    One method per file of the schema; JSON is written through :func:`sotjax.io.dumps_json`
    (NumPy values converted, NaN/inf as ``null``).
    """

    def __init__(self, staging: Path, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown run kind {kind!r}")
        self.path = Path(staging)
        self.kind = kind

    def _json(self, name: str, obj: Any) -> None:
        from sotjax.io import dumps_json

        (self.path / name).write_text(dumps_json(obj), encoding="utf-8")

    def write_weights(self, ids: Sequence[Any], weights: Any, logits: Any, selection: Any) -> None:
        """``weights.parquet`` (one row per corpus sample, input order) and ``selected_ids.npy``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({
            "id": pa.array([str(i) for i in ids], type=pa.string()),
            "weight": pa.array(np.asarray(weights, dtype=np.float64)),
            "logit": pa.array(np.asarray(logits, dtype=np.float64)),
            "rank": pa.array(np.asarray(selection.rank, dtype=np.int64)),
            "selected": pa.array(np.asarray(selection.selected, dtype=bool)),
            "train_weight": pa.array(np.asarray(selection.train_weight, dtype=np.float64)),
        })
        pq.write_table(table, self.path / WEIGHTS)
        kept = np.asarray([str(i) for i in np.asarray(ids, dtype=object)[selection.selected_indices]], dtype=str)
        buffer = io.BytesIO()
        np.save(buffer, kept, allow_pickle=False)
        (self.path / SELECTED_IDS).write_bytes(buffer.getvalue())

    def write_config(self, config: Mapping[str, Any]) -> None:
        """``config.json``, with ``"schema"`` first."""
        self._json(CONFIG, _with_schema(config))

    def write_stats(self, stats: Mapping[str, Any]) -> None:
        """``stats.json``, with ``"schema"`` first."""
        self._json(STATS, _with_schema(stats))

    def write_metrics(self, metrics: Mapping[str, Mapping[str, Any]]) -> None:
        """``metrics.json``: ``{method: {metric: value}}``."""
        self._json(METRICS, metrics)

    def write_benchmark(self, rows: Sequence[Mapping[str, str]]) -> None:
        """``benchmark.parquet``: one row per benchmark record, the columns :data:`BENCHMARK_COLUMNS`."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({c: pa.array([str(r[c]) for r in rows], pa.string()) for c in BENCHMARK_COLUMNS})
        pq.write_table(table, self.path / BENCHMARK)

    def write_embeddings(self, sets: Mapping[str, Any]) -> None:
        """``embeddings.npz``: the :data:`EMBEDDING_SETS` as 2-D float32 arrays."""
        arrays: dict[str, Any] = {k: np.asarray(sets[k], dtype=np.float32) for k in EMBEDDING_SETS}
        np.savez(self.path / EMBEDDINGS, **arrays)

    def write_conditioner(self, conditioner: Any) -> None:
        """``conditioning.npz`` (a fitted :class:`~sotjax.conditioning.Conditioner`); nothing for None."""
        if conditioner is None:
            return
        import json

        arrays = {k: getattr(conditioner, k) for k in CONDITIONER_ARRAYS if getattr(conditioner, k) is not None}
        np.savez(self.path / CONDITIONING, config=np.array(json.dumps(conditioner.config.to_dict())), **arrays)

    def write_head(self, head: Any) -> None:
        """``head.safetensors`` and ``head.json`` of a trained weight head (a :class:`sotjax.head.TrainedHead`);
        nothing for None."""
        if head is None:
            return
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in head.arrays.items()}, str(self.path / HEAD_WEIGHTS))
        self._json(HEAD_CONFIG, _with_schema(head.meta()))

    def write_report(self, **kwargs: Any) -> None:
        """``report.html`` and its figures (:func:`sotjax.report.write_report` with ``kwargs``)."""
        from sotjax.report import write_report

        write_report(self.path, **kwargs)

    def write_links(self, columns: Mapping[str, Any]) -> None:
        """``links.parquet`` of an audit: ``id_a``, ``set_a``, ``id_b``, ``set_b`` (strings), ``cosine``
        (float32), ``row_a``, ``row_b`` (int64), ``mutual`` (bool) — :func:`sotjax.audit.links_table`."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = {"id_a": pa.string(), "set_a": pa.string(), "id_b": pa.string(), "set_b": pa.string(),
                 "cosine": pa.float32(), "row_a": pa.int64(), "row_b": pa.int64(), "mutual": pa.bool_()}
        table = pa.table({k: pa.array(np.asarray(columns[k]).tolist() if t == pa.string() else np.asarray(columns[k]),
                                      type=t) for k, t in types.items()})
        pq.write_table(table, self.path / LINKS)

    def write_audit_summary(self, summary: Mapping[str, Any]) -> None:
        """``summary.json`` of an audit, with ``"schema"`` first."""
        self._json(AUDIT_SUMMARY, _with_schema(summary))

    def write_audit_html(self, text: str) -> None:
        """``audit.html`` (:func:`sotjax.audit.summary_html`)."""
        (self.path / AUDIT_HTML).write_text(text, encoding="utf-8")


@contextlib.contextmanager
def writing_run(out_dir: str | os.PathLike, kind: str,
                inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[RunWriter]:
    """Yield a :class:`RunWriter` on a staging directory; on success it becomes ``out_dir`` with its marker.

    Before the swap the staging directory must hold the files a run of ``kind`` requires and
    nothing outside the schema (a programming error otherwise). The output is checked again just
    before the swap (it may have changed during a long job). A failure while writing (disk full,
    permissions) raises :class:`SotjaxRuntimeError` naming ``out_dir``; the staging directory is
    removed and an earlier run at ``out_dir`` survives intact.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown run kind {kind!r}")
    inputs = list(inputs)
    check_output_dir(out_dir, inputs, kind)
    out = Path(out_dir)
    try:
        with atomic_directory(out) as staging:
            yield RunWriter(staging, kind)
            files, reason = _tree(staging)
            files = sorted(f for f in files if f != OWNER_FILE)
            unknown = [f for f in files if f not in FILES[kind]]
            missing = [f for f in REQUIRED[kind] if f not in files]
            if unknown or missing or reason is not None:
                raise ValueError(f"a {kind} run must hold {', '.join(REQUIRED[kind])} and only files of {SCHEMA}; "
                                 f"missing {missing}, unknown {unknown}" + ("" if reason is None else f"; it {reason}"))
            (staging / MARKER).write_text(marker_text(kind, files), encoding="utf-8")
            check_output_dir(out, inputs, kind)
    except OSError as err:
        what = err.strerror or type(err).__name__
        raise SotjaxRuntimeError(f"{out}: cannot write the run directory ({what}); nothing was written"
                                 + ("" if not out.exists() else ", the earlier run there is unchanged")) from None


def write_run(
    out_dir: str | os.PathLike,
    ids: Any,
    weights: Any,
    logits: Any,
    selection: Any,
    config: Mapping[str, Any],
    stats: Mapping[str, Any],
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    conditioner: Any = None,
    head: Any = None,
) -> Path:
    """Write a ``sotjax weigh`` run directory atomically: it appears complete, or not at all.

    Files: ``weights.parquet``, ``selected_ids.npy``, ``config.json``, ``stats.json``, the marker
    and ``conditioning.npz`` when a ``conditioner`` was fitted, ``head.safetensors`` + ``head.json`` when a
    weight ``head`` was trained (see the module docstring).
    """
    with writing_run(out_dir, "weigh", inputs) as run:
        run.write_weights(ids, weights, logits, selection)
        run.write_conditioner(conditioner)
        run.write_head(head)
        run.write_config(config)
        run.write_stats(stats)
    return Path(out_dir)


def write_eval(run_dir: str | os.PathLike, report: Mapping[str, Any], text: str) -> None:
    """Add ``eval.json`` (``report`` with ``"schema"``) and ``eval.md`` (``text``) to a run, each atomically.

    Only into a run directory sotjax wrote (:func:`is_run_dir`); anything else is refused with one line.
    """
    from sotjax.io import dumps_json

    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise SotjaxInputError(
            f"{run_dir}: not a sotjax run directory (no valid {MARKER} marker, or files sotjax did "
            "not write); eval writes only into its own runs: pass --no-write to print only")
    write_text_atomic(run_dir / EVAL_JSON, dumps_json(_with_schema(report)))
    write_text_atomic(run_dir / EVAL_MD, text)


# ------------------------------------------------------------------------------------------ reader
@dataclasses.dataclass(frozen=True, eq=False)
class RunDir:
    """A run directory read back by :func:`read_run`: every file of the schema as a named field.

    ``kind`` / ``version`` come from the marker (None without one); ``files`` are the files the
    marker lists plus those ``sotjax eval`` added (without a marker: the schema's files present).
    ``rank``, ``selected``, ``train_weight`` and ``selected_ids`` are None only for an unmarked
    directory that lacks them; ``stats``, ``metrics`` and ``eval`` are None
    when the run has no such file. ``keep``, ``seed`` and ``epsilon`` are read from ``config.json``
    (None when it does not say). The large files are read on request: :meth:`read_benchmark`,
    :meth:`read_embeddings`.
    """

    path: Path
    kind: str | None
    version: int | None
    files: tuple[str, ...]
    ids: tuple[str, ...]
    weights: np.ndarray
    logits: np.ndarray
    rank: np.ndarray | None
    selected: np.ndarray | None
    train_weight: np.ndarray | None
    selected_ids: tuple[str, ...] | None
    config: dict[str, Any]
    stats: dict[str, Any] | None
    metrics: dict[str, Any] | None
    eval: dict[str, Any] | None
    keep: float | None
    seed: int | None
    epsilon: float | None
    benchmark_config: dict[str, Any] | None

    @property
    def schema(self) -> str | None:
        """``"sotjax.run/2"`` (or ``/1`` for a run written before the schema); None without a marker."""
        return None if self.version is None else schema_of(self.version)

    @property
    def n(self) -> int:
        return len(self.ids)

    def has(self, name: str) -> bool:
        """Whether the run holds the file ``name`` (a regular file, not a link)."""
        p = self.path / name
        return p.is_file() and not p.is_symlink()

    def read_benchmark(self) -> dict[str, np.ndarray]:
        """``benchmark.parquet`` as ``{column: array}`` (:data:`BENCHMARK_COLUMNS`; ``id``/``label``
        at least for a run without a schema-2 marker)."""
        import pyarrow.parquet as pq

        from sotjax.io import read_parquet_columns

        path = self.path / BENCHMARK
        columns: Sequence[str] = BENCHMARK_COLUMNS
        if (self.version or 0) < 2:  # an older or unmarked run: id and label, and what else it has
            try:
                names = set(pq.read_schema(path).names)
            except Exception:  # read_parquet_columns names the problem
                names = set()
            columns = ["id", "label", *(c for c in BENCHMARK_COLUMNS if c in names and c not in ("id", "label"))]
        cols = read_parquet_columns(path, columns)
        return {k: np.asarray([str(v) for v in a.tolist()], dtype=object) for k, a in cols.items()}

    def read_embeddings(self) -> dict[str, np.ndarray]:
        """``embeddings.npz`` as ``{"corpus", "safe", "harmful"}`` 2-D float arrays (never unpickled);
        the corpus must have one row per row of ``weights.parquet``."""
        import zipfile

        path = self.path / EMBEDDINGS
        from sotjax.io import check_input_file

        check_input_file(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in EMBEDDING_SETS if k not in z.files]
                if missing:
                    raise SotjaxInputError(f"{path}: array(s) {', '.join(missing)} missing")
                emb = {k: z[k] for k in EMBEDDING_SETS}
        except ValueError as err:
            if isinstance(err, SotjaxInputError):
                raise
            if "pickle" in str(err):
                raise SotjaxInputError(f"{path}: holds pickled (object) arrays; refusing to unpickle") from None
            raise SotjaxInputError(f"{path}: not a readable .npz of arrays ({type(err).__name__})") from None
        except (OSError, zipfile.BadZipFile, EOFError) as err:
            raise SotjaxInputError(f"{path}: not a readable .npz of arrays ({type(err).__name__})") from None
        for k, v in emb.items():
            if v.ndim != 2 or not np.issubdtype(v.dtype, np.floating):
                raise SotjaxInputError(f"{path}: array '{k}' must be a 2-D float array, got {v.dtype} {v.shape}")
        if emb["corpus"].shape[0] != self.n:
            raise SotjaxInputError(f"{path}: corpus has {emb['corpus'].shape[0]} rows, {WEIGHTS} {self.n}")
        return emb


    def read_conditioner(self) -> Any:
        """The run's fitted :class:`~sotjax.conditioning.Conditioner` (``conditioning.npz``), or None when
        the run used raw features. Never unpickles; a damaged file is one line naming it."""
        import json
        import zipfile

        from sotjax.conditioning import Conditioner
        from sotjax.io import check_input_file

        path = self.path / CONDITIONING
        if not self.has(CONDITIONING):
            return None
        check_input_file(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                data: dict[str, Any] = {k: (z[k].tolist() if k in z.files else None) for k in CONDITIONER_ARRAYS}
                if "config" not in z.files:
                    raise SotjaxInputError(f"{path}: array 'config' missing")
                data["config"] = json.loads(str(z["config"]))
            dims = [len(v) for v in (data["mean"], data["scale"], data["matrix"]) if isinstance(v, list)]
            data["dim"] = dims[0] if dims else 1
            return Conditioner.from_dict(data)
        except SotjaxInputError as err:
            raise SotjaxInputError(f"{path}: {err}") from None
        except (ValueError, OSError, zipfile.BadZipFile, EOFError, json.JSONDecodeError) as err:
            raise SotjaxInputError(f"{path}: not a readable conditioning file ({type(err).__name__})") from None


    def read_head(self) -> Any:
        """The run's trained weight head (a :class:`sotjax.head.TrainedHead`, with the run's conditioner), read
        from ``head.safetensors`` + ``head.json``; one line naming the file when the run has none or it is
        damaged."""
        from sotjax import head as head_lib
        from sotjax.io import check_input_file

        if not (self.has(HEAD_WEIGHTS) and self.has(HEAD_CONFIG)):
            raise SotjaxInputError(f"{self.path}: the run has no weight head ({HEAD_WEIGHTS}, {HEAD_CONFIG}); "
                                   "train one with `sotjax weigh ... --head linear|mlp`")
        meta = _read_json_object(self.path / HEAD_CONFIG, schema_of(self.version) if self.version else None)
        path = self.path / HEAD_WEIGHTS
        check_input_file(path)
        if path.stat().st_size > MAX_HEAD_BYTES:
            raise SotjaxInputError(f"{path}: larger than {MAX_HEAD_BYTES} bytes (not a weight head sotjax wrote)")
        try:
            from safetensors.numpy import load

            arrays = load(path.read_bytes())
        except Exception as err:  # safetensors raises several types for bad files
            raise SotjaxInputError(f"{path}: not a readable safetensors file ({type(err).__name__})") from None
        return head_lib.from_files(meta, arrays, self.read_conditioner(), str(path))


def _read_json_object(path: Path, required_schema: str | None) -> dict[str, Any]:
    from sotjax.io import read_json_file

    obj = read_json_file(path, MAX_JSON_BYTES, path.name)
    if not isinstance(obj, dict):
        raise SotjaxInputError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    if required_schema is not None and obj.get("schema") != required_schema:
        raise SotjaxInputError(f"{path}: field 'schema' must be {required_schema!r} (as in {MARKER}), "
                               f"got {shorten(obj.get('schema'))}")
    return obj


def _read_weights(path: Path, strict: bool) -> dict[str, np.ndarray | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sotjax.io import check_input_file

    check_input_file(path)
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types
        raise SotjaxInputError(f"{path}: not a readable Parquet file ({type(err).__name__})") from None
    required = WEIGHTS_COLUMNS if strict else WEIGHTS_COLUMNS[:3]
    for c in required:
        if c not in table.column_names:
            raise SotjaxInputError(f"{path}: column '{c}' is missing")
    if table.num_rows == 0:
        raise SotjaxInputError(f"{path}: holds no rows")
    numbers = (pa.types.is_floating, pa.types.is_integer)
    kinds = {"id": (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer), "weight": numbers,
             "logit": numbers, "rank": (pa.types.is_integer,), "selected": (pa.types.is_boolean,),
             "train_weight": numbers}
    expected = {"id": "strings", "weight": "numbers", "logit": "numbers", "rank": "integers",
                "selected": "booleans", "train_weight": "numbers"}
    out: dict[str, np.ndarray | None] = {}
    for c in WEIGHTS_COLUMNS:
        if c not in table.column_names:
            out[c] = None
            continue
        column = table.column(c)
        if not any(check(column.type) for check in kinds[c]):
            raise SotjaxInputError(f"{path}: column '{c}' has type {column.type}, expected {expected[c]}")
        if column.null_count:
            raise SotjaxInputError(f"{path}: column '{c}' has {column.null_count} null value(s)")
        out[c] = column.to_numpy(zero_copy_only=False)
    return out


def _read_selected_ids(path: Path) -> tuple[str, ...]:
    from sotjax.io import check_input_file

    check_input_file(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as err:  # numpy raises several types for bad files
        raise SotjaxInputError(f"{path}: not a readable .npy array ({type(err).__name__})") from None
    if arr.ndim != 1 or arr.dtype.kind not in "US":
        raise SotjaxInputError(f"{path}: expected a 1-D array of id strings, got {arr.dtype} {arr.shape}")
    return tuple(str(v) for v in arr.tolist())


def _config_fields(path: Path, config: dict[str, Any]) -> tuple[float | None, int | None, float | None,
                                                                  dict[str, Any] | None]:
    """``keep``, ``seed``, ``epsilon`` and the benchmark config of ``config.json`` (None where absent)."""
    sot = config.get("sot", {})
    if not isinstance(sot, dict):
        raise SotjaxInputError(f"{path}: field 'sot' must be an object, got {type(sot).__name__}")
    bench = config.get("benchmark")
    if bench is not None and not isinstance(bench, dict):
        raise SotjaxInputError(f"{path}: field 'benchmark' must be an object, got {type(bench).__name__}")

    def number(value: Any, field: str, kind: type) -> Any:
        if value is None:
            return None
        ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            raise SotjaxInputError(f"{path}: field '{field}' must be a number, got {shorten(value)}")
        return kind(value)

    keep = number(config["keep"], "keep", float) if "keep" in config else number(sot.get("keep"), "sot.keep", float)
    seed = None if bench is None else number(bench.get("seed"), "benchmark.seed", int)
    epsilon = number(sot.get("epsilon"), "sot.epsilon", float)
    return keep, seed, epsilon, bench


def read_run(run_dir: str | os.PathLike) -> RunDir:
    """Read a run directory (any kind, this schema or an older one) into a :class:`RunDir`.

    With a marker, the marker is validated (:func:`parse_marker`), every file it lists and every
    file its kind requires must be there, ``weights.parquet`` must have all of
    :data:`WEIGHTS_COLUMNS`, and ``config.json`` / ``stats.json`` (and ``eval.json``) must carry
    the marker's schema (schema 2 on). Without a marker only ``weights.parquet`` (``id``,
    ``weight``, ``logit``) is required. Each problem is one :class:`SotjaxInputError` line naming
    the file and the field or column.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise SotjaxInputError(f"{path}: run directory not found")
    marker = parse_marker(path)
    if marker is not None and marker["kind"] not in WEIGHT_KINDS:
        raise SotjaxInputError(f"{path}: is a sotjax {marker['kind']} run; it has no {WEIGHTS} "
                               + ("(give the weigh or demo run it was made from)" if marker["kind"] == "finetune"
                                  else "(not a weigh or demo run)"))
    strict = marker is not None
    version = None if marker is None else int(marker["version"])
    kind = None if marker is None else str(marker["kind"])
    json_schema = schema_of(version) if version is not None and version >= 2 else None
    if marker is not None:
        listed = tuple(marker["files"])
        for name in (*listed, *(n for n in REQUIRED[str(kind)] if n not in listed)):
            p = path / name
            if not p.exists() and not p.is_symlink():
                why = "listed in" if name in listed else f"a {kind} run holds it; not listed in"
                raise SotjaxInputError(f"{p}: file not found ({why} {MARKER})")
        files = tuple(sorted({*listed, *(n for n in ADDED_LATER if (path / n).is_file())}))
    else:
        known = {*(n for k in WEIGHT_KINDS for n in FILES[k]), *ADDED_LATER}
        files = tuple(sorted(n for n in known if (path / n).is_file()))

    def present(name: str) -> bool:
        return (path / name).exists() or (path / name).is_symlink()

    columns = _read_weights(path / WEIGHTS, strict)
    id_column = columns["id"]
    assert id_column is not None
    ids = tuple(str(i) for i in id_column.tolist())
    selected_ids = _read_selected_ids(path / SELECTED_IDS) if (strict or present(SELECTED_IDS)) else None
    if selected_ids is not None and columns["selected"] is not None:
        n_selected = int(np.count_nonzero(columns["selected"]))
        if len(selected_ids) != n_selected:
            raise SotjaxInputError(f"{path / SELECTED_IDS}: holds {len(selected_ids)} ids, "
                                   f"{WEIGHTS} selects {n_selected}")
    config = _read_json_object(path / CONFIG, json_schema) if (strict or present(CONFIG)) else {}
    stats = _read_json_object(path / STATS, json_schema) if (strict or present(STATS)) else None
    metrics = _read_json_object(path / METRICS, None) if present(METRICS) else None
    evaluated = _read_json_object(path / EVAL_JSON, json_schema) if present(EVAL_JSON) else None
    keep, seed, epsilon, bench = _config_fields(path / CONFIG, config)

    def floats(c: str) -> np.ndarray:
        return np.asarray(columns[c], dtype=np.float64)

    return RunDir(
        path=path, kind=kind, version=version, files=files, ids=ids,
        weights=floats("weight"), logits=floats("logit"),
        rank=None if columns["rank"] is None else np.asarray(columns["rank"], dtype=np.int64),
        selected=None if columns["selected"] is None else np.asarray(columns["selected"], dtype=bool),
        train_weight=None if columns["train_weight"] is None else floats("train_weight"),
        selected_ids=selected_ids, config=config, stats=stats, metrics=metrics, eval=evaluated,
        keep=keep, seed=seed, epsilon=epsilon, benchmark_config=bench,
    )
