"""End-to-end Stage 1 on files: read -> validate -> fit -> select -> write the run directory.

Everything is validated before any computation and before anything is written, so bad input
leaves no output behind.
"""

from __future__ import annotations

import dataclasses
import platform
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sotjax import io, rundir
from sotjax.config import SOTConfig
from sotjax.errors import SotjaxInputError, SotjaxWarning
from sotjax.learn import SOTResult, fit
from sotjax.select import Selection, effective_sample_size, resolve_keep_count, select, train_weights


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("sotjax", "jax", "jaxlib", "ott-jax", "optax", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_stats(result: SOTResult, selection: Selection, shapes: dict[str, Any]) -> dict[str, Any]:
    """The content of ``stats.json`` of every run kind (weigh, demo): traces, solver diagnostics,
    timings, concentration, the memory plan, versions (schema: :mod:`sotjax.rundir`)."""
    import jax

    kept = selection.selected
    other = "softmax" if selection.reweight == "exp" else "exp"
    return {
        "shapes": shapes,
        "converged": result.converged,
        "message": result.message,
        "n_steps": result.n_steps,
        "objective": result.objective.tolist(),
        "pull": result.pull.tolist(),
        "push": result.push.tolist(),
        "entropy_term": result.entropy_term.tolist(),
        "sinkhorn_iterations": {"safe": result.sinkhorn_iterations[:, 0].tolist(),
                                "harmful": result.sinkhorn_iterations[:, 1].tolist()},
        "adjoint_iterations": {"safe": result.adjoint_iterations[:, 0].tolist(),
                               "harmful": result.adjoint_iterations[:, 1].tolist()},
        "sinkhorn_all_converged": bool(result.sinkhorn_converged.all()),
        "sinkhorn_error": {"safe": result.sinkhorn_error[:, 0].tolist(),
                           "harmful": result.sinkhorn_error[:, 1].tolist()},
        "adjoint_converged": result.adjoint_converged.tolist(),
        "geometry": {k: (None if v is None else vars(v)) for k, v in result.geometry.items()},
        "timings_s": dict(result.timings),
        "selection": {
            "keep_count": selection.keep_count,
            "reweight": selection.reweight,
            "ess": selection.ess,
            f"ess_{other}": effective_sample_size(train_weights(result.weights, kept, other)[kept]),
            "ess_weights": effective_sample_size(result.weights),
            "max_weight": float(result.weights.max()),
        },
        "plan": None if result.plan is None else result.plan.to_dict(),
        "devices": [str(d) for d in jax.devices()],
        "versions": versions(),
    }


def summary_line(result: SOTResult, selection: Selection, out: Path) -> str:
    t = result.timings
    return (
        f"sotjax weigh: {result.message}\n"
        f"  objective {result.objective[-1]:.6f} (pull {result.pull[-1]:.6f}, push {result.push[-1]:.6f});"
        f" kept {selection.keep_count}/{selection.rank.size} (ESS {selection.ess:.1f});"
        f" {t['total']:.2f} s ({t['compile']:.2f} s first step incl. compile)\n"
        f"  wrote {out}/weights.parquet, selected_ids.npy, config.json, stats.json"
    )


def weigh_arrays(
    corpus: np.ndarray, safe: np.ndarray | None, harmful: np.ndarray | None, config: SOTConfig,
    *, progress: bool = False, names: dict[str, str] | None = None,
) -> tuple[SOTResult, Selection]:
    """Fit and select; K <= n is checked before fitting, the sets by ``fit`` (``names`` label them)."""
    resolve_keep_count(len(corpus), config.keep, config.keep_count)
    result = fit(corpus, safe, harmful, config, progress=progress, names=names)
    selection = select(result.weights, config.keep, config.keep_count, config.reweight, logits=result.logits)
    return result, selection


@dataclasses.dataclass(frozen=True)
class TextInputOptions:
    """How text inputs (records without embeddings) are read and embedded."""

    features: Any = None  # sotjax.features.FeatureConfig; None = its defaults
    prompt_field: str = "prompt"
    response_field: str = "response"
    id_field: str = "id"
    text_field: str = "text"


def read_set(
    path: Path, ids: Path | None = None, text: TextInputOptions | None = None, progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One input set as ``(embeddings, ids, provenance)``: embedding files are read as they are,
    text records (prompt/response or text) are embedded with :mod:`sotjax.features`."""
    path = Path(path)
    if not path.exists():
        raise SotjaxInputError(f"{path}: no such file")
    if io.holds_embeddings(path):
        x, x_ids = io.read_embeddings(path, ids)
        return x, x_ids, {"path": str(path), "sha256": io.file_sha256(path), "kind": "embeddings"}
    if ids is not None:
        raise SotjaxInputError(f"{ids}: an ids file is only used with a .npy input ({path} is text)")
    from sotjax.features import FeatureConfig, embed_texts_report, read_text_records

    text = text or TextInputOptions()
    try:
        records = read_text_records(path, prompt_field=text.prompt_field, response_field=text.response_field,
                                    id_field=text.id_field, text_field=text.text_field)
    except SotjaxInputError as err:
        if "neither field" not in str(err):
            raise
        # neither an embedding set nor text records: say both
        detail = str(err).split(": ", 1)[1]
        raise SotjaxInputError(f"{path}: field '{io.EMBEDDING_FIELD}' is missing and {detail}") from None
    features = text.features or FeatureConfig()
    x, report = embed_texts_report(records.prompts, records.responses, features, progress)
    provenance = {"path": str(path), "sha256": io.file_sha256(path) if path.is_file() else None,
                  "kind": "text", "features": dataclasses.asdict(features),
                  "n_truncated": getattr(report, "n_truncated", None),
                  "model_fingerprint": getattr(report, "fingerprint", None)}
    return np.asarray(x), np.asarray(records.ids, dtype=object), provenance


def weigh_files(
    corpus: Path, safe: Path | None, harmful: Path | None, out: Path, config: SOTConfig,
    *, ids: Path | None = None, progress: bool = True, argv: Sequence[str] | None = None,
    text: TextInputOptions | None = None, head: Any = None, dedup: float | None = None,
) -> str:
    """The ``sotjax weigh`` job. Returns the summary to print.

    ``head``: a :class:`sotjax.head.HeadConfig` to learn the logits with a weight head (one process only);
    the head is written into the run (``head.safetensors``, ``head.json``).
    ``dedup``: a cosine threshold; within-corpus near-copy clusters (:mod:`sotjax.audit`) are fitted as one
    mass and their weight is spread back over the copies (:func:`sotjax.audit.fit_dedup`; one process only).

    In a run of several processes (``jax.distributed`` joined, :mod:`sotjax.distributed`) every
    process calls it with the same arguments: see :func:`_weigh_files_processes`.
    """
    from sotjax import distributed

    if distributed.several_processes():
        if head is not None:
            raise SotjaxInputError("--head: a run of several processes cannot train a weight head yet")
        if dedup is not None:
            raise SotjaxInputError("--dedup: a run of several processes cannot merge duplicates yet")
        return _weigh_files_processes(corpus, safe, harmful, out, config, ids=ids, progress=progress, argv=argv,
                                      text=text)
    cache_dir = getattr(text.features, "cache_dir", None) if text is not None else None
    input_paths = [corpus, safe, harmful, ids, cache_dir]  # never replaced by --out
    rundir.check_output_dir(out, input_paths)
    if dedup is not None and head is not None:
        raise SotjaxInputError("--dedup and --head cannot be combined yet (the head is fitted on every row)")
    needed = {"safe": config.lam < 1.0, "harmful": config.lam > 0.0}
    for name, path in (("safe", safe), ("harmful", harmful)):
        if path is None and needed[name]:
            raise SotjaxInputError(f"--{name}: required when lam = {config.lam:g}")
    if dedup is not None and (isinstance(dedup, bool) or not isinstance(dedup, (int, float)) or not 0.0 < dedup <= 1.0):
        raise SotjaxInputError(f"--dedup: must be a cosine threshold in (0, 1], got {dedup!r}")
    x, x_ids, corpus_info = read_set(corpus, ids, text, progress)
    inputs: dict[str, Any] = {"corpus": corpus_info}
    if ids is not None:
        inputs["ids"] = {"path": str(ids), "sha256": io.file_sha256(ids)}
    sets: dict[str, np.ndarray | None] = {"safe": None, "harmful": None}
    for name, path in (("safe", safe), ("harmful", harmful)):
        if path is None or not needed[name]:
            continue
        sets[name], _, inputs[name] = read_set(path, None, text, progress)
    names = {"corpus": str(corpus), "safe": str(safe), "harmful": str(harmful)}
    trained = None
    merged: dict[str, Any] | None = None
    if dedup is not None:
        from sotjax.audit import fit_dedup

        resolve_keep_count(len(x), config.keep, config.keep_count)
        deduped = fit_dedup(x, sets["safe"], sets["harmful"], config, threshold=dedup, warn=False, progress=progress,
                            names=names)
        result = dataclasses.replace(deduped.result, weights=deduped.weights, logits=deduped.logits)
        selection = select(result.weights, config.keep, config.keep_count, config.reweight, logits=result.logits)
        merged = {"threshold": dedup, "clusters": int((deduped.sizes > 1).sum()),
                  "rows_merged": int(len(x) - deduped.sizes.size), "largest_cluster": int(deduped.sizes.max()),
                  "warnings": list(deduped.warnings)}
        for line in deduped.warnings:
            warnings.warn(line, SotjaxWarning, stacklevel=2)
    elif head is None:
        result, selection = weigh_arrays(x, sets["safe"], sets["harmful"], config, progress=progress, names=names)
    else:
        from sotjax.head import feature_provenance, fit_head

        resolve_keep_count(len(x), config.keep, config.keep_count)
        fitted = fit_head(x, sets["safe"], sets["harmful"], config, head, progress=progress, names=names,
                          features=feature_provenance(corpus_info))
        result, trained = fitted.result, fitted.head
        selection = select(result.weights, config.keep, config.keep_count, config.reweight, logits=result.logits)
    shapes: dict[str, int | None] = {"n": int(x.shape[0]), "dim": int(x.shape[1])}
    shapes.update({f"n_{k}": (None if v is None else int(v.shape[0])) for k, v in sets.items()})
    config_json = {"sot": config.to_dict(), "inputs": inputs,
                   "command": list(argv) if argv is not None else None, "versions": versions()}
    stats = run_stats(result, selection, shapes)
    if merged is not None:
        stats["dedup"] = merged
        config_json["dedup"] = {"threshold": dedup}
    rundir.write_run(out, x_ids, result.weights, result.logits, selection, config_json, stats, inputs=input_paths,
                     conditioner=result.conditioner, head=trained)
    if not result.converged:
        warnings.warn(result.message, SotjaxWarning, stacklevel=2)
    return summary_line(result, selection, out)


def _map_npy(path: Path) -> np.ndarray:
    """A 2-D float ``.npy`` file memory-mapped (``mmap_mode="r"``): nothing is read beyond its header
    until rows are indexed. The checks and messages of :func:`sotjax.io.read_embeddings`, without ids."""
    io.check_input_file(path)
    x = io.open_npy(path)
    return x


def _open_set(path: Path, ids: Path | None) -> tuple[np.ndarray, np.ndarray | None]:
    """One embedding set of a multi-process run, as ``(x, ids)``: a ``.npy`` file memory-mapped
    (``ids`` None: the writer reads them later), a ``.jsonl``/``.parquet`` file read whole; text is refused."""
    path = Path(path)
    if not path.exists():
        raise SotjaxInputError(f"{path}: no such file")
    if not io.holds_embeddings(path):
        raise SotjaxInputError(f"{path}: a run of several processes reads embeddings only (.npy, or .jsonl/.parquet "
                               f"with an '{io.EMBEDDING_FIELD}' field); embed text first with `sotjax embed`")
    if path.suffix.lower() == ".npy":
        if ids is not None:
            io.check_input_file(ids)
        return _map_npy(path), None
    x, x_ids = io.read_embeddings(path, ids)
    return x, x_ids


def _weigh_files_processes(
    corpus: Path, safe: Path | None, harmful: Path | None, out: Path, config: SOTConfig,
    *, ids: Path | None, progress: bool, argv: Sequence[str] | None, text: TextInputOptions | None,
) -> str:
    """:func:`weigh_files` as one of several processes (every process calls it with the same arguments).

    Each process memory-maps the ``.npy`` inputs, and :func:`sotjax.learn.fit` pages in only this
    process's rows of the corpus (the reference sets are read whole by every process). Process 0
    (the writer) alone checks and writes ``out``, reads the corpus ids, hashes the inputs for
    ``config.json`` and shows progress; the others return one line. Every step that can fail on
    one process only ends in :func:`sotjax.distributed.stop_together`, so an error anywhere stops
    every process at once (no process is left waiting in a collective). Phases, in order: cheap
    checks (each process, and ``out`` on the writer); ids and hashes (writer); the fit; the run
    directory (writer).
    """
    import jax

    from sotjax import distributed

    writer = distributed.is_writer()
    me, count = jax.process_index(), jax.process_count()
    cache_dir = getattr(text.features, "cache_dir", None) if text is not None else None
    input_paths = [corpus, safe, harmful, ids, cache_dir]  # never replaced by --out
    needed = {"safe": config.lam < 1.0, "harmful": config.lam > 0.0}
    sets: dict[str, np.ndarray | None] = {"safe": None, "harmful": None}
    # 1. cheap checks on every process, before anything slow (the first collective waits ~30 s at most)
    with distributed.stop_together():
        if writer:
            rundir.check_output_dir(out, input_paths)
        for name, path in (("safe", safe), ("harmful", harmful)):
            if path is None and needed[name]:
                raise SotjaxInputError(f"--{name}: required when lam = {config.lam:g}")
        x, x_ids = _open_set(corpus, ids)
        for name, path in (("safe", safe), ("harmful", harmful)):
            if path is not None and needed[name]:
                sets[name], _ = _open_set(path, None)
        resolve_keep_count(len(x), config.keep, config.keep_count)
    # 2. the writer's provenance: the corpus ids (O(n) strings) and the inputs' SHA-256
    inputs: dict[str, Any] = {}
    with distributed.stop_together():
        if writer:
            if x_ids is None:
                x_ids = io.read_embeddings(corpus, ids)[1]
            for name, path in (("corpus", corpus), ("safe", safe), ("harmful", harmful)):
                if path is not None and (name == "corpus" or needed[name]):
                    inputs[name] = {"path": str(path), "sha256": io.file_sha256(path), "kind": "embeddings"}
                if name == "corpus" and ids is not None:
                    inputs["ids"] = {"path": str(ids), "sha256": io.file_sha256(ids)}
    names = {"corpus": str(corpus), "safe": str(safe), "harmful": str(harmful)}
    # 3. the fit: errors in a process's rows are shared by fit itself
    result = fit(x, sets["safe"], sets["harmful"], config, progress=progress and writer, names=names)
    # 4. the run directory (writer); a write failure stops the others too
    summary = f"sotjax weigh: process {me} of {count} finished (process 0 wrote {out})"
    with distributed.stop_together():
        if writer:
            selection = select(result.weights, config.keep, config.keep_count, config.reweight, logits=result.logits)
            shapes: dict[str, int | None] = {"n": int(x.shape[0]), "dim": int(x.shape[1])}
            shapes.update({f"n_{k}": (None if v is None else int(v.shape[0])) for k, v in sets.items()})
            config_json = {"sot": config.to_dict(), "inputs": inputs,
                           "command": list(argv) if argv is not None else None, "versions": versions()}
            stats = run_stats(result, selection, shapes)
            rundir.write_run(out, x_ids, result.weights, result.logits, selection, config_json, stats,
                             inputs=input_paths, conditioner=result.conditioner)
            if not result.converged:
                warnings.warn(result.message, SotjaxWarning, stacklevel=2)
            summary = summary_line(result, selection, out)
    return summary
