r"""Memory planner: which Stage-1 plan fits the memory, and with which block size.

A push-pull fit solves entropic OT between the corpus (``n`` rows, dimension ``d``) and each
reference (``m_k`` rows; ``M = \sum_k m_k``). What it stores is dominated by ``n x M`` matrices:

==============  ==================================================  =================================
plan            stored per corpus-reference pair                     bytes (itemsize ``s`` of dtype)
==============  ==================================================  =================================
``dense``       cost :math:`C`, kernel :math:`K`, :math:`K\odot C`  :math:`3 s\, n M`
``dense-bf16``  the kernel :math:`K` only, in bfloat16, row blocks   :math:`2\, n M + 16 B M + 2 s n d`
``stream``      nothing: a block of ``B`` rows at a time              :math:`\approx 6 s\, B M` + inputs
==============  ==================================================  =================================

plus the inputs (:math:`s (n + M) d`), ``O(n)`` vectors (logits, optimiser state, potentials,
gradients: about 24 per corpus row) and a fixed runtime overhead. The ``divergence`` loss adds a
corpus x corpus term (:math:`M \to M + n`). The constants were fitted to the peak RSS measured on
the dense path (0.4 GiB + 62.7 KB per corpus row at ``M = 5050``, float32: 12.4 bytes per entry,
i.e. three float32 matrices). ``dense-bf16`` (:class:`sotjax.streaming.StoredKernel`) keeps one
bfloat16 kernel (2 bytes per entry, for every row of the padded corpus) and, while a block is used,
``BF16_TEMPORARIES`` float32 ``(B, M)`` working copies; until the kernels are built, two more copies of
the corpus's unit rows are alive (peak RSS measured at n = 80k and 300k, M = 5050, d = 384: 14.7 KB per
padded corpus row, the model 14.8; totals within 1%). Its blocks are sized so that one working copy
(``B x max m_k x 4`` bytes, about ``BF16_BLOCK_BYTES``) stays in the CPU's cache. It runs in float32
only, and only while the kernel keeps its range, :math:`\max C/\varepsilon \le 30`
(``sotjax.geometry.MAX_KERNEL_EXPONENT``): before the data is read the planner knows only
:math:`C \le 2` (``COST_BOUND``), so it needs an absolute :math:`\varepsilon \ge 2/30`; the loss must
not be ``divergence`` (its corpus x corpus term is dense).

Row padding. The corpus is padded with zero-mass rows to :func:`padded_rows`: a size bucket (five
significant bits, so at most 1/16 = 6.25% more rows; every ``n`` up to 32 is its own bucket), then a
multiple of the device count (dense) or of ``devices x block_rows`` (stream and dense-bf16, with the
block balanced so the padding stays below one block per device). A fit at a new ``n`` in a bucket
already compiled reuses the compiled step.

``auto`` picks the fastest plan whose estimate fits the budget: dense, then dense-bf16 (when it can
run: float32, epsilon known and large enough), then stream with the largest block that fits (a
multiple of 8 rows, at most ``MAX_BLOCK_ROWS``). The user never picks a block size;
:attr:`MemoryPlan.reason` says why a plan was chosen.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Literal

from sotjax.errors import SotjaxInputError

PlanKind = Literal["dense", "dense-bf16", "stream"]
PLAN_KINDS: tuple[str, ...] = ("auto", "dense", "dense-bf16", "stream")
#: plans the engine runs
AVAILABLE: tuple[str, ...] = ("dense", "dense-bf16", "stream")

#: fixed runtime overhead (XLA, Python, libraries), bytes; measured 0.4 GiB on the dense path
OVERHEAD_BYTES = 400 << 20
#: O(n) vectors kept per corpus row (logits, optimiser state, potentials, gradients, temporaries)
VECTORS_PER_ROW = 24
#: live (B, M) temporaries of one streamed block (cost, exponent, plan, products)
STREAM_TEMPORARIES = 6
MIN_BLOCK_ROWS = 8
MAX_BLOCK_ROWS = 8192
#: dense-bf16: target bytes of one block's float32 working copy (B x max m x 4), cache-resident; measured
#: at m = 5000 on a 2-core EPYC (32 MiB L3): 250-500 rows per block equally fast, 80 and 1000 slower
BF16_BLOCK_BYTES = 8 << 20
#: dense-bf16: live (B, M) float32 temporaries of one block (upcast kernel, its cost, K * C, products)
BF16_TEMPORARIES = 4
#: the cosine cost's upper bound (C = 1 - cos in [0, 2]): all the planner knows of max C
COST_BOUND = 2.0
#: share of the available memory a default budget takes
DEFAULT_BUDGET_FRACTION = 0.6

_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
          "T": 1000**4, "TB": 1000**4, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_bytes(text: str, what: str = "--memory-budget") -> int:
    """``"8GiB"``, ``"500MB"``, ``"1.5G"``, ``"123456"`` -> bytes (one-line error otherwise)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise SotjaxInputError(f"{what}: expected a size like 8GiB, 500MB or 2e9 bytes, got {str(text)[:40]!r}")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise SotjaxInputError(f"{what}: must be positive, got {str(text)[:40]!r}")
    return value


def available_memory_bytes() -> int:
    """Memory available to this process: ``MemAvailable`` (Linux), capped by a cgroup limit."""
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 8 << 30
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file, encoding="ascii") as handle:
                text = handle.read().strip()
            if text.isdigit():
                avail = min(avail, int(text))
        except OSError:
            continue
    return int(avail)


def default_budget_bytes(device_memory: int | None = None) -> int:
    """A safe share of the accelerator's memory if given, else of the host's available memory."""
    base = device_memory if device_memory else available_memory_bytes()
    return int(DEFAULT_BUDGET_FRACTION * base)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """The plan a fit runs with (written to ``stats.json`` as ``"plan"``)."""

    kind: PlanKind
    block_rows: int | None  # None when dense (stream and dense-bf16 run in row blocks)
    sharded_devices: int
    estimated_bytes: int
    budget_bytes: int
    reason: str
    padded_rows: int = 0  # corpus rows after zero-mass padding (:func:`padded_rows`); 0: not computed

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def bucket_rows(n: int) -> int:
    """``n`` rounded up to five significant bits (16 buckets per octave, at most 6.25% more)."""
    n = int(n)
    shift = max(0, n.bit_length() - 5)
    return -(-n >> shift) << shift if shift else n


def balanced_block(rows_per_device: int, block_rows: int) -> int:
    """The smallest block (a multiple of ``MIN_BLOCK_ROWS`` when at least that) that covers
    ``rows_per_device`` in as many blocks as ``block_rows`` would: same pass count, least padding."""
    blocks = -(-rows_per_device // max(1, block_rows))
    block = -(-rows_per_device // blocks)
    if block >= MIN_BLOCK_ROWS:
        block = -(-block // MIN_BLOCK_ROWS) * MIN_BLOCK_ROWS
    return min(block, max(block_rows, 1)) if block_rows >= MIN_BLOCK_ROWS else block


def padded_rows(n: int, devices: int = 1, block_rows: int | None = None) -> int:
    """Corpus rows after zero-mass padding: the size bucket of ``n``, then a multiple of ``devices``
    (dense) or of ``devices * block_rows`` (streamed)."""
    unit = max(1, devices) * (block_rows or 1)
    return -(-bucket_rows(n) // unit) * unit


def _itemsize(dtype: str) -> int:
    return 8 if dtype == "float64" else 4


def bf16_block_rows(rows: int, ref_sizes: tuple[int, ...]) -> int:
    """The dense-bf16 block for ``rows`` corpus rows per device: ``BF16_BLOCK_BYTES`` of float32 working
    copy against the largest reference (a multiple of 8, within the limits), balanced over the rows."""
    widest = max((int(m) for m in ref_sizes), default=1)
    block = min(MAX_BLOCK_ROWS, max(MIN_BLOCK_ROWS, BF16_BLOCK_BYTES // (4 * max(widest, 1))))
    block -= block % MIN_BLOCK_ROWS
    if block >= rows:  # one block per device: the rows rounded up to a multiple of 8
        block = -(-rows // MIN_BLOCK_ROWS) * MIN_BLOCK_ROWS if rows >= MIN_BLOCK_ROWS else max(rows, 1)
    return balanced_block(rows, block)


def bf16_refusal(dtype: str, loss: str, epsilon: float | None) -> str | None:
    """Why the dense-bf16 plan cannot run with these settings (one clause), or None when it can."""
    if dtype != "float32":
        return f"the bfloat16 kernel is float32-only (--dtype {dtype})"
    if loss == "divergence":
        return "the divergence loss's corpus x corpus term has no bfloat16 plan (--loss divergence)"
    from sotjax.geometry import MAX_KERNEL_EXPONENT  # noqa: PLC0415 - keep this module free of jax

    limit = MAX_KERNEL_EXPONENT["float32"]
    if epsilon is None:
        return (f"the absolute --epsilon is not known before the data is read (--relative-epsilon), and the kernel"
                f" exp(-C/epsilon) needs max C/epsilon <= {limit:g}")
    if COST_BOUND / float(epsilon) > limit:
        return (f"--epsilon {float(epsilon):g} is too small: the kernel exp(-C/epsilon) needs max C/epsilon"
                f" <= {limit:g}, and C reaches {COST_BOUND:g}, so --epsilon >= {COST_BOUND / limit:.3g}")
    return None


def estimate_bytes(kind: str, n: int, ref_sizes: tuple[int, ...], dim: int, dtype: str = "float32",
                   loss: str = "transport", block_rows: int | None = None, devices: int = 1) -> int:
    """Peak bytes of one device's share (the corpus axis split over ``devices``) for a plan."""
    s = _itemsize(dtype)
    refs = int(sum(ref_sizes)) + (n if loss == "divergence" else 0)
    rows = -(-n // max(1, devices))
    fixed = OVERHEAD_BYTES + s * (rows + refs) * dim + VECTORS_PER_ROW * s * rows
    if kind == "dense":
        return fixed + 3 * s * rows * refs
    if kind == "dense-bf16":
        b = bf16_block_rows(-(-bucket_rows(n) // max(1, devices)), ref_sizes) if block_rows is None else block_rows
        stored = padded_rows(n, devices, b) // max(1, devices)  # the kernel has the padding rows too
        # + the corpus's unit rows twice more (padded): its device copy and its normalised rows live next to
        # the kernel until the geometries are built (measured peak RSS at n = 80k and 300k, M = 5050,
        # d = 384: 14.7 KB per padded corpus row, within 1% of this model)
        return fixed + 2 * s * stored * dim + 2 * stored * refs + BF16_TEMPORARIES * 4 * b * refs
    if kind == "stream":
        b = MIN_BLOCK_ROWS if block_rows is None else block_rows
        return fixed + STREAM_TEMPORARIES * s * b * refs
    raise ValueError(f"unknown plan kind {kind!r}")


def plan_memory(n: int, ref_sizes: tuple[int, ...], dim: int, *, dtype: str = "float32",
                loss: str = "transport", budget_bytes: int | None = None, kind: str = "auto",
                devices: int = 1, epsilon: float | None = None) -> MemoryPlan:
    """Choose the plan (see the module docstring). A forced ``kind`` that does not fit, or dense-bf16 where
    it cannot run, is refused with one line. ``epsilon``: the absolute epsilon (None: not known, e.g.
    relative; then dense-bf16 is not offered)."""
    if kind not in PLAN_KINDS:
        raise SotjaxInputError(f"--plan: must be one of {', '.join(PLAN_KINDS)}, got {kind!r}")
    budget = int(budget_bytes) if budget_bytes is not None else default_budget_bytes()
    refs = tuple(int(m) for m in ref_sizes)
    est = {k: estimate_bytes(k, n, refs, dim, dtype, loss, devices=devices) for k in ("dense", "dense-bf16")}
    gib = 1 << 30
    rows_per_device = -(-bucket_rows(n) // max(1, devices))
    bf16_block = bf16_block_rows(rows_per_device, refs)
    est["dense-bf16"] = estimate_bytes("dense-bf16", n, refs, dim, dtype, loss, block_rows=bf16_block, devices=devices)
    bf16_not = bf16_refusal(dtype, loss, epsilon)

    def bf16_plan(why: str) -> MemoryPlan:
        return MemoryPlan("dense-bf16", bf16_block, devices, est["dense-bf16"], budget, why,
                          padded_rows(n, devices, bf16_block))

    def stream_plan(why: str) -> MemoryPlan:
        fixed = estimate_bytes("stream", n, refs, dim, dtype, loss, block_rows=0, devices=devices)
        per_row = STREAM_TEMPORARIES * _itemsize(dtype) * (sum(refs) + (n if loss == "divergence" else 0))
        rows = -(-bucket_rows(n) // max(1, devices))
        fit_rows = (budget - fixed) // max(per_row, 1)
        block = int(min(MAX_BLOCK_ROWS, max(fit_rows, 0)))
        if block >= rows:  # one block per device: the rows rounded up to a multiple of 8
            block = -(-rows // MIN_BLOCK_ROWS) * MIN_BLOCK_ROWS if rows >= MIN_BLOCK_ROWS else rows
        block = max(MIN_BLOCK_ROWS, block - block % MIN_BLOCK_ROWS) if block >= MIN_BLOCK_ROWS else block
        if block < 1 or fixed + per_row * block > budget:
            need = fixed + per_row * MIN_BLOCK_ROWS
            raise SotjaxInputError(
                f"--memory-budget: {budget / gib:.2f} GiB is too small even for the streamed plan "
                f"(needs about {need / gib:.2f} GiB for n = {n}); raise the budget")
        block = balanced_block(rows, block)
        total = estimate_bytes("stream", n, refs, dim, dtype, loss, block_rows=block, devices=devices)
        return MemoryPlan("stream", block, devices, total, budget, why, padded_rows(n, devices, block))

    if kind not in AVAILABLE and kind != "auto":
        raise SotjaxInputError(f"--plan {kind}: not available in this version; use {', '.join(('auto', *AVAILABLE))}")
    if kind == "dense-bf16" and bf16_not is not None:
        raise SotjaxInputError(f"--plan dense-bf16: {bf16_not}; use --plan auto, dense or stream")
    if kind == "dense" or kind == "dense-bf16":
        if est[kind] > budget:
            raise SotjaxInputError(
                f"--plan {kind}: needs about {est[kind] / gib:.2f} GiB, over the budget of {budget / gib:.2f} GiB; "
                "use --plan auto (or stream), or raise --memory-budget")
        if kind == "dense-bf16":
            return bf16_plan("requested")
        return MemoryPlan("dense", None, devices, est[kind], budget, "requested", padded_rows(n, devices))
    if kind == "stream":
        return stream_plan("requested")
    if est["dense"] <= budget:
        return MemoryPlan("dense", None, devices, est["dense"], budget,
                          f"dense fits ({est['dense'] / gib:.2f} of {budget / gib:.2f} GiB)", padded_rows(n, devices))
    over = f"dense needs {est['dense'] / gib:.2f} GiB > budget {budget / gib:.2f} GiB"
    if bf16_not is None and est["dense-bf16"] <= budget:
        return bf16_plan(f"{over}; the bfloat16 kernel fits ({est['dense-bf16'] / gib:.2f} GiB)")
    if bf16_not is None:
        return stream_plan(f"{over}, dense-bf16 {est['dense-bf16'] / gib:.2f} GiB too")
    return stream_plan(f"{over}; no dense-bf16: {bf16_not}")
