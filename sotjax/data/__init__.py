"""Offline real-text benchmark: contaminated corpus, safe anchor, harmful reference.

See :mod:`sotjax.data.benchmark` (the builder) and :mod:`sotjax.data.sources` (readers).
"""

from sotjax.data.benchmark import (
    HARMFUL_VARIANTS,
    SAFE_VARIANTS,
    Benchmark,
    BenchmarkConfig,
    Pools,
    build_benchmark,
    load_asset_pools,
    load_benchmark_jsonl,
    load_jsonl_pools,
    overlap_report,
)
from sotjax.data.sources import BENIGN, HARMFUL, Record, normalize_text, pair_hash, read_jsonl, text_hash

__all__ = [
    "BENIGN",
    "HARMFUL",
    "HARMFUL_VARIANTS",
    "SAFE_VARIANTS",
    "Benchmark",
    "BenchmarkConfig",
    "Pools",
    "Record",
    "build_benchmark",
    "load_asset_pools",
    "load_benchmark_jsonl",
    "load_jsonl_pools",
    "normalize_text",
    "overlap_report",
    "pair_hash",
    "read_jsonl",
    "text_hash",
]
