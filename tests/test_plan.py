"""Memory planner: sizes, choices and block rows follow the documented byte model."""

from __future__ import annotations

import pytest

from sotjax.errors import SotjaxInputError
from sotjax.plan import (
    MAX_BLOCK_ROWS,
    OVERHEAD_BYTES,
    estimate_bytes,
    parse_bytes,
    plan_memory,
)

GIB = 1 << 30


@pytest.mark.parametrize("text, value", [("8GiB", 8 << 30), ("500MB", 500_000_000), ("1.5G", 1_500_000_000),
                                         ("123456", 123456), (" 2 gib ", 2 << 30), ("64KiB", 65536)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "lots", "8 parsecs", "-1G", "0", "1e400GB"[:3] + "X"])
def test_parse_bytes_refuses(text):
    with pytest.raises(SotjaxInputError, match="--memory-budget"):
        parse_bytes(text)


def test_dense_estimate_matches_the_measured_dense_path():
    # measured on the landed dense path: 0.4 GiB + 62.7 KB per corpus row (M = 5050, d = 384, float32)
    for n in (100_000, 300_000):
        est = estimate_bytes("dense", n, (50, 5000), 384)
        measured = 0.4 * GIB + 62.7e3 * n
        assert abs(est - measured) / measured < 0.1, (n, est / GIB, measured / GIB)


def test_auto_picks_dense_then_bf16_then_stream():
    refs = (50, 5000)
    small = plan_memory(5000, refs, 384, budget_bytes=16 * GIB)
    assert small.kind == "dense" and small.block_rows is None and small.estimated_bytes <= 16 * GIB
    mid = plan_memory(350_000, refs, 384, budget_bytes=16 * GIB, epsilon=0.1)
    assert mid.kind == "dense-bf16" and mid.block_rows is not None and mid.padded_rows % mid.block_rows == 0
    assert estimate_bytes("dense-bf16", 350_000, refs, 384) <= 16 * GIB < estimate_bytes("dense", 350_000, refs, 384)
    # without an absolute epsilon (relative: known only after the data) auto skips dense-bf16
    assert plan_memory(350_000, refs, 384, budget_bytes=16 * GIB).kind == "stream"
    big = plan_memory(3_000_000, refs, 384, budget_bytes=16 * GIB, epsilon=0.1)
    assert big.kind == "stream" and big.block_rows is not None
    assert big.block_rows % 8 == 0 and big.block_rows <= MAX_BLOCK_ROWS
    assert big.estimated_bytes <= 16 * GIB and big.budget_bytes == 16 * GIB
    # float64 has no bf16 plan
    assert plan_memory(350_000, refs, 384, dtype="float64", budget_bytes=16 * GIB, epsilon=0.1).kind == "stream"


def test_stream_block_rows_shrink_with_the_budget_and_stay_bounded():
    refs = (50, 5000)
    blocks = [plan_memory(10**6, refs, 384, kind="stream", budget_bytes=b * GIB).block_rows for b in (2, 4, 8)]
    assert blocks[0] < blocks[1] <= blocks[2] <= MAX_BLOCK_ROWS
    # a bigger corpus does not change the block (memory is O(n d) + O(B M))
    assert plan_memory(4 * 10**6, refs, 384, kind="stream", budget_bytes=8 * GIB).block_rows == blocks[2]
    # small corpora: one block, the rows rounded up to a multiple of 8 (n = 100 -> 104)
    small = plan_memory(100, refs, 16, kind="stream", budget_bytes=8 * GIB)
    assert (small.block_rows, small.padded_rows) == (104, 104)


def test_devices_split_the_corpus_rows():
    one = plan_memory(400_000, (50, 5000), 384, budget_bytes=16 * GIB)
    four = plan_memory(400_000, (50, 5000), 384, budget_bytes=16 * GIB, devices=4)
    assert one.kind != "dense" and four.kind == "dense" and four.sharded_devices == 4


def test_forced_plans_and_too_small_budgets_are_one_line_errors():
    with pytest.raises(SotjaxInputError, match="--plan dense: needs about"):
        plan_memory(10**6, (50, 5000), 384, kind="dense", budget_bytes=16 * GIB)
    with pytest.raises(SotjaxInputError, match="too small"):
        plan_memory(10**6, (50, 5000), 384, budget_bytes=OVERHEAD_BYTES)
    with pytest.raises(SotjaxInputError, match="--plan"):
        plan_memory(10, (5,), 4, kind="sparse")
    with pytest.raises(SotjaxInputError, match="--plan dense-bf16: --epsilon 0.01 is too small"):
        plan_memory(10, (5,), 4, kind="dense-bf16", epsilon=0.01)
    assert plan_memory(10, (5,), 4, kind="dense-bf16", epsilon=0.1).kind == "dense-bf16"


def test_divergence_counts_the_corpus_self_term():
    base = estimate_bytes("dense", 20_000, (50, 5000), 384)
    div = estimate_bytes("dense", 20_000, (50, 5000), 384, loss="divergence")
    assert div - base == 3 * 4 * 20_000 * 20_000 + 4 * 20_000 * 384  # three n x n matrices + the inputs
    assert abs(div / GIB - 6.3) < 0.5  # measured peak RSS of the dense divergence fit at n = 20k


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 100, 999, 1000, 1023, 1025, 5000, 123_457, 10**6])
def test_padded_rows_bucket_is_tight_and_shared(n):
    from sotjax.plan import bucket_rows, padded_rows

    b = bucket_rows(n)
    # five significant bits: b = k * 2^s with k <= 32 (b = n up to 32), never below n, at most 1/16 above
    assert n <= b <= n * (1 + 1 / 16)
    s = max(0, n.bit_length() - 5)
    assert b % (1 << s) == 0 and (b >> s) <= 32
    for devices, block in ((1, None), (4, None), (4, 64), (3, 24)):
        p = padded_rows(n, devices, block)
        unit = devices * (block or 1)
        assert p % unit == 0 and b <= p < b + unit
    # every n in a bucket shares it (one compiled program)
    assert bucket_rows(b) == b and bucket_rows(max(1, b - 1)) in (b, b - 1)
