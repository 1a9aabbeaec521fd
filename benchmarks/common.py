"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

from sotjax.bench import cpu_name

__all__ = ["cpu_name"]
