"""``sotjax bench``: the table and the JSON on a tiny grid, skipped sizes and plans, one-line errors.

Fast by design (a 256 x 16 problem, 2 timed iterations): the numbers themselves are not checked for
speed, only for consistency with each other and with an independent computation.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time

import pytest
from cli_helpers import one_line_error, sotjax

from sotjax import bench
from sotjax.commands import bench as bench_command

MACHINE_KEYS = {"platform", "device_kind", "device_count", "jax", "jaxlib", "ott", "pot",
                "jax_default_matmul_precision", "cpu", "cores"}
FLOOR_KEYS = {"gemm_flops", "exp_per_s", "read_bytes_per_s", "copy_bytes_per_s"}
HAVE_POT = importlib.util.find_spec("ot") is not None


def test_bench_command_prints_the_table_and_writes_the_json(tmp_path):
    out = tmp_path / "results" / "bench.json"
    # 600 MB: the 256-row size fits every plan; the 2e6-row one fits none (0.6-1.3 GB estimated)
    proc = sotjax("bench", "--n", "256,2000000", "--m", "16", "--d", "8", "--iterations", "2", "--repeats", "1",
                  "--memory-budget", "600MB", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert sorted(p.name for p in out.parent.iterdir()) == ["bench.json"]  # no temporary left
    assert set(report["machine"]) >= MACHINE_KEYS
    assert report["machine"]["jax_default_matmul_precision"] == "highest"  # the default of the command
    assert set(report["floors"]) >= FLOOR_KEYS and all(report["floors"][k] > 0 for k in FLOOR_KEYS)

    rows = report["rows"]
    assert [(r["n"], r["plan"]) for r in rows] == [(n, p) for n in (256, 2_000_000) for p in bench.PLANS]
    floors = report["floors"]
    count = len(bench.PLANS)
    for row in rows[:count]:
        if row["plan"] == "pot" and not HAVE_POT:
            assert row["status"] == "skipped" and "not installed" in row["reason"]
            continue
        assert row["status"] == "ok", row
        seconds = row["seconds_per_iteration"]
        assert seconds > 0 and row["iterations"] >= 2  # raised when 2 last under MIN_TIMED_SECONDS
        # pair evaluations per second: n*m pairs per iteration
        assert math.isclose(row["pairs_per_second"], 256 * 16 / seconds, rel_tol=1e-9)
        # the floor, recomputed from the floors of the same run
        expected_floor = {
            "dense": 2 * 4 * 256 * 16 / floors["read_bytes_per_s"],
            "dense-bf16": 2 * 2 * 256 * 16 / floors["read_bytes_per_s"],  # two passes over 2-byte entries
            "ott": 2 * 256 * 16 / floors["exp_per_s"],
            "pot": 2 * 256 * 16 / floors["exp_per_s"],
            "stream": 2 * 256 * 16 * 8 / (row["floor_rate"] or math.nan),
        }[row["plan"]]
        assert math.isclose(row["floor_seconds_per_iteration"], expected_floor, rel_tol=1e-9)
        assert math.isclose(row["percent_of_floor"], 100 * expected_floor / seconds, rel_tol=1e-9)
    stream = rows[bench.PLANS.index("stream")]
    assert stream["floor"] == "gemm" and stream["block_rows"] == 256
    for row in rows[count:]:  # too large: skipped with the reason, nothing measured
        if row["plan"] == "dense-bf16":  # refused by the planner (its one-line reason)
            assert row["status"] == "skipped" and "over the budget" in row["reason"], row
            continue
        assert row["status"] == "skipped" and row["reason"].startswith("does not fit"), row
        assert row["seconds_per_iteration"] is None and row["estimated_bytes"] > 600_000_000

    lines = proc.stdout.splitlines()
    assert any("jax_default_matmul_precision=highest" in line for line in lines)
    assert sum(" 256 " in line and "skipped" not in line for line in lines) == (count if HAVE_POT else count - 1)
    assert sum("2000000" in line and "skipped: does not fit" in line for line in lines) == count - 1


def test_per_iteration_cancels_the_setup():
    """An independent clock: a 'solve' of 30 ms setup + 4 ms per iteration measures 4 ms per iteration."""

    def run(k):
        time.sleep(0.030 + 0.004 * k)

    timing = bench.per_iteration(run, iterations=10, repeats=1, warm=False)
    assert timing.seconds_per_iteration == pytest.approx(0.004, rel=0.25)
    assert timing.note == ""


def test_pot_missing_is_skipped_not_a_crash(monkeypatch):
    monkeypatch.setitem(sys.modules, "ot", None)  # `import ot` fails; find_spec says absent
    size = bench.Size(64, 8, 4)
    reason, _, _ = bench.skip_reason("pot", size, 1 << 40, 1 << 40)
    assert reason is not None and "not installed" in reason
    rows = bench.run_bench([size], ("pot",), iterations=1, floors={}, budget_bytes=1 << 40,
                           host_budget_bytes=1 << 40)
    assert len(rows) == 1 and rows[0]["status"] == "skipped" and "not installed" in rows[0]["reason"]
    line = bench.format_row(rows[0])
    assert "POT" in line and "skipped: POT is not installed" in line


def test_the_command_grids_are_the_library_grids():
    assert bench_command.QUICK_GRID == bench.QUICK_GRID and bench_command.FULL_GRID == bench.FULL_GRID
    assert bench.FULL_GRID == {"n": (10**4, 10**5, 10**6), "m": (50, 5000), "d": (64, 384, 768)}


@pytest.mark.parametrize("args", [
    ("--n", "abc"), ("--n", "0"), ("--m", "1.5"), ("--plans", "dense,gpu"), ("--iterations", "0"),
    ("--precision", "tf32"), ("--quick", "--full"), ("--memory-budget", "lots"), ("--epsilon", "-1"),
])
def test_bad_flags_are_one_line_exit_2(tmp_path, args):
    out = tmp_path / "b.json"
    line = one_line_error(sotjax("bench", *args, "--out", out), 2, "bench")
    assert args[0] in line
    assert not out.exists()


def test_out_naming_a_directory_is_refused(tmp_path):
    line = one_line_error(sotjax("bench", "--out", tmp_path), 2, "bench")
    assert "directory" in line


def test_help_says_which_grid_is_the_default():
    proc = sotjax("bench", "--help")
    assert proc.returncode == 0
    assert "--quick (the default)" in proc.stdout and "--full" in proc.stdout
