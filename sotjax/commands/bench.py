"""``sotjax bench``: Sinkhorn throughput of every plan on this machine, side by side with ott-jax and
POT, and the machine's floors measured in the same run (see :mod:`sotjax.bench`).

Prints a fixed-width table (one line per size and plan, as it is measured) and, with ``--out``,
writes the JSON (machine, settings, floors, rows) atomically. Every option is checked before any
work: a bad value is one line, exit 2.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

HELP = "benchmark Sinkhorn throughput per plan (sotjax dense/stream, ott-jax, POT) against this machine's floors"
PRECISIONS = ("highest", "high", "default")
#: the grids of --quick and --full (equal to sotjax.bench.QUICK_GRID / FULL_GRID, kept here so that a
#: bad option is refused before jax is imported)
QUICK_GRID: dict[str, tuple[int, ...]] = {"n": (10_000,), "m": (50, 5000), "d": (64, 384, 768)}
FULL_GRID: dict[str, tuple[int, ...]] = {"n": (10_000, 100_000, 1_000_000), "m": (50, 5000), "d": (64, 384, 768)}
MAX_SIZE = 10**10

EPILOG = """\
grids: --quick (the default) measures n = 10000 with every m in 50,5000 and d in 64,384,768: a few
minutes on a 2-core CPU. --full measures the whole grid n in 10000,100000,1000000 (meant for an
accelerator: on a small CPU the n = 10^6 rows take hours). --n/--m/--d replace that axis of the grid.

Each row: seconds per Sinkhorn iteration (the difference of solves forced to 2 and 2+ITERATIONS
iterations, each compiled once and warmed up first), pair evaluations per second (n*m / seconds per
iteration) and the share of the machine's floor measured in the same run (streamed: GEMM FLOP/s at the
block's shape; sotjax dense: memory bandwidth over the stored kernel; ott-jax and POT: exp/s). Plans
that would not fit the memory budget, and POT when it is not installed or above 1e8 pairs, are skipped
with the reason in their row.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--quick", action="store_true", help="the default grid (n = 10000; see below)")
    parser.add_argument("--full", action="store_true", help="the whole grid n in 10000,100000,1000000 (accelerators)")
    parser.add_argument("--n", default=None, help="corpus sizes, comma list (e.g. 10000,100000); replaces the grid's")
    parser.add_argument("--m", default=None, help="reference sizes, comma list (grid: 50,5000)")
    parser.add_argument("--d", default=None, help="dimensions, comma list (grid: 64,384,768)")
    parser.add_argument("--plans", default="dense,dense-bf16,stream,ott,pot",
                        help="comma list of dense, dense-bf16, stream, ott, pot [all]")
    parser.add_argument("--iterations", default="5", help="timed Sinkhorn iterations per solve [5]")
    parser.add_argument("--repeats", default="2", help="timed solves per iteration count, best kept [2]")
    parser.add_argument("--epsilon", default="0.1", help="entropic epsilon (cosine cost units) [0.1]")
    parser.add_argument("--precision", default="highest",
                        help="jax_default_matmul_precision: highest (default; full float32 cost), high, or "
                             "default (TF32 on A100/H100: shows its effect)")
    parser.add_argument("--memory-budget", default=None,
                        help="bytes a plan may use (e.g. 40GiB); default 60%% of the accelerator's memory "
                             "(of the host's available memory on CPU)")
    parser.add_argument("--out", default=None, help="write the JSON (machine, floors, rows) to this file")


def _ints(text: str, flag: str) -> tuple[int, ...]:
    from sotjax.errors import SotjaxInputError, shorten

    values = []
    for item in str(text).split(","):
        item = item.strip().replace("_", "")
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value != int(value) or not 1 <= value <= MAX_SIZE:
            raise SotjaxInputError(f"{flag}: expected a comma list of positive integers, got {shorten(text, 40)}")
        values.append(int(value))
    return tuple(dict.fromkeys(values))


def _int(text: str, flag: str, low: int, high: int) -> int:
    from sotjax.errors import SotjaxInputError, shorten

    try:
        value = int(str(text).strip())
    except ValueError:
        raise SotjaxInputError(f"{flag}: expected an integer, got {shorten(text, 40)}") from None
    if not low <= value <= high:
        raise SotjaxInputError(f"{flag}: must be between {low} and {high}, got {value}")
    return value


def check_out(out: str) -> Path:
    """The ``--out`` path, refused (one line) when it cannot be a file we can write."""
    from sotjax.errors import SotjaxInputError

    where = f"--out {out}"
    if not out.strip() or "\0" in out:
        raise SotjaxInputError("--out: give a file path such as bench.json")
    path = Path(out)
    if out.endswith(("/", os.sep)) or path.is_dir():
        raise SotjaxInputError(f"{where}: names a directory; give a file path such as {path / 'bench.json'}")
    if path.exists() and not path.is_file():
        raise SotjaxInputError(f"{where}: exists and is not a regular file")
    ancestor = path.absolute().parent
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise SotjaxInputError(f"{where}: cannot be created ({ancestor} is not a writable directory)")
    return path


def parse_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every option checked and converted (one :class:`SotjaxInputError` line on the first bad one)."""
    from sotjax.errors import SotjaxInputError, shorten
    from sotjax.plan import parse_bytes

    if args.quick and args.full:
        raise SotjaxInputError("--quick and --full: give one of them")
    base = FULL_GRID if args.full else QUICK_GRID
    sizes = {axis: base[axis] if getattr(args, axis) is None else _ints(getattr(args, axis), f"--{axis}")
             for axis in ("n", "m", "d")}
    plans = tuple(dict.fromkeys(p.strip() for p in str(args.plans).split(",")))
    known = ("dense", "dense-bf16", "stream", "ott", "pot")
    bad = [p for p in plans if p not in known]
    if bad or not plans:
        raise SotjaxInputError(f"--plans: expected a comma list of {', '.join(known)}, got {shorten(args.plans, 40)}")
    try:
        epsilon = float(args.epsilon)
    except ValueError:
        epsilon = math.nan
    if not math.isfinite(epsilon) or epsilon <= 0:
        raise SotjaxInputError(f"--epsilon: expected a positive number, got {shorten(args.epsilon, 40)}")
    if args.precision not in PRECISIONS:
        raise SotjaxInputError(f"--precision: expected one of {', '.join(PRECISIONS)}, "
                               f"got {shorten(args.precision, 40)}")
    return {
        "grid": "full" if args.full else ("custom" if any(getattr(args, a) for a in "nmd") else "quick"),
        **sizes,
        "plans": plans,
        "iterations": _int(args.iterations, "--iterations", 1, 100_000),
        "repeats": _int(args.repeats, "--repeats", 1, 100),
        "epsilon": epsilon,
        "precision": args.precision,
        "memory_budget_bytes": None if args.memory_budget is None else parse_bytes(args.memory_budget),
        "out": None if args.out is None else check_out(args.out),
    }


def run(args: argparse.Namespace) -> int:
    import datetime

    settings = parse_settings(args)  # before importing jax: a bad option costs nothing

    from sotjax import bench
    from sotjax.atomic import write_text_atomic
    from sotjax.io import dumps_json

    bench.set_matmul_precision(settings["precision"])
    device_budget, host_budget = bench.default_budgets()
    if settings["memory_budget_bytes"] is not None:
        device_budget = host_budget = settings["memory_budget_bytes"]
    info = bench.machine_info()
    print(bench.format_machine(info), flush=True)
    floors = bench.measure_floors()
    print(bench.format_floors(floors), flush=True)
    print(f"budget: {device_budget / (1 << 30):.2f} GiB (device), {host_budget / (1 << 30):.2f} GiB (host, POT); "
          f"epsilon {settings['epsilon']}; {settings['iterations']} timed iterations", flush=True)
    print(bench.table_header(), flush=True)
    sizes = bench.grid(settings["n"], settings["m"], settings["d"])
    rows = bench.run_bench(sizes, settings["plans"], iterations=settings["iterations"], epsilon=settings["epsilon"],
                           repeats=settings["repeats"], budget_bytes=device_budget, host_budget_bytes=host_budget,
                           floors=floors, on_row=lambda row: print(bench.format_row(row), flush=True))
    if settings["out"] is not None:
        report = {
            "format": "sotjax-bench/1",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": info,
            "settings": {**{k: v for k, v in settings.items() if k != "out"},
                         "budget_bytes": device_budget, "host_budget_bytes": host_budget,
                         "warmup_iterations": bench.WARMUP_ITERATIONS, "pot_max_pairs": bench.POT_MAX_PAIRS},
            "floors": floors,
            "rows": rows,
        }
        write_text_atomic(settings["out"], dumps_json(report))
        print(f"wrote {settings['out']}", flush=True)
    return 0
