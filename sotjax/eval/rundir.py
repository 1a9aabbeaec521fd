"""Run directories of ``sotjax demo``: writing (inside an atomic staging dir) and reading back.

Layout (all ids, numbers and plots; never prompt or response text):

* ``weights.parquet``: ``id, weight, logit, rank, selected, train_weight`` (the ``sotjax weigh`` table).
* ``selected_ids.npy``: ids of the Top-K, best first (unicode array).
* ``benchmark.parquet``: ``set, id, label, source, hash`` for every corpus/safe/harmful row.
* ``embeddings.npz``: ``corpus``, ``safe``, ``harmful`` float32 features (for ``sotjax eval``).
* ``config.json``: SOT config, benchmark config, features, keep; enough to reproduce the run.
* ``stats.json``: traces (objective/pull/push), Sinkhorn iterations, timings, benchmark counts.
* ``metrics.json``: metrics of SOT, its ablations and the baselines.
* ``report.html`` + ``weights.png``, ``traces.png``, ``projection.png``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sotjax.errors import SotjaxInputError
from sotjax.io import dumps_json, to_jsonable  # noqa: F401  (re-exported for eval/demo)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(dumps_json(obj), encoding="utf-8")


def write_manifest(path: Path, rows: Sequence[Mapping[str, str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = ("set", "id", "label", "source", "hash")
    pq.write_table(pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in cols}), path)


def read_parquet_columns(path: Path, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """Read columns of a parquet file; one-line errors naming the file/column."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise SotjaxInputError(f"{path}: file not found")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types
        raise SotjaxInputError(f"{path}: not a readable parquet file ({err.__class__.__name__})") from None
    out = {}
    for c in columns:
        if c not in table.column_names:
            raise SotjaxInputError(f"{path}: column '{c}' is missing")
        out[c] = table.column(c).to_numpy(zero_copy_only=False)
    return out


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise SotjaxInputError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SotjaxInputError(f"{path}: not valid JSON (line {err.lineno})") from None
    except (ValueError, RecursionError, UnicodeDecodeError) as err:
        raise SotjaxInputError(f"{path}: not valid JSON ({type(err).__name__})") from None
