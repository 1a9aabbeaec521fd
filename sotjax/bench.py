r"""Accelerator benchmark: Sinkhorn throughput per plan, side by side with ott-jax and POT, against
the machine's floors measured in the same run (``sotjax bench``; ``benchmarks/bench_scale.py`` is a
thin wrapper over this module).

For each size ``(n, m, d)`` (random unit rows, uniform marginals, cosine cost, entropic ``epsilon``)
and each plan it measures the seconds of one Sinkhorn iteration:

=========  =====================================================================================
plan       what runs
=========  =====================================================================================
``dense``  sotjax's dense plan: :func:`sotjax.geometry.cosine_geometry` in kernel mode (``C`` and
           ``K`` stored) solved by :func:`sotjax.transport.solve_sinkhorn`
``stream`` sotjax's streamed plan: :mod:`sotjax.streaming` with the block the memory planner
           (:func:`sotjax.plan.plan_memory`) would choose; the cost is recomputed per block by a GEMM
``ott``    ott-jax's ``Sinkhorn`` (log mode) on a dense ``PointCloud``; its squared-Euclidean cost is
           ``2 C`` on unit rows, so it runs at ``2 epsilon``: the same problem
``pot``    POT's ``ot.sinkhorn(method="sinkhorn_log")`` in NumPy float64 on the host (optional:
           skipped when ``pot`` is not installed, or above :data:`POT_MAX_PAIRS` pairs)
=========  =====================================================================================

**Timing.** Every solve is forced to run its iterations (a stopping threshold below 0, which no
error reaches). A plan's solve is compiled once for a short solve (:data:`WARMUP_ITERATIONS`
iterations) and once for a long one (``WARMUP_ITERATIONS + iterations``), both outside the timed calls
(the first call of each is the warm-up; its time is reported as ``compile_seconds``); each is then
timed (best of ``repeats``, :func:`jax.block_until_ready`) and one iteration is the difference
divided by ``iterations``, so setup and the final reductions cancel. Pair evaluations per second are
``n m`` (one iteration touches every corpus-reference pair) divided by the seconds per iteration.

Timed iterations lasting less than :data:`MIN_TIMED_SECONDS` (small problems: dispatch and timer noise)
are raised once, with one more compile; each row records how many were timed.

**Floors**, measured in the same process: GEMM FLOP/s (float32, ``Precision.HIGHEST``) on a square
product and, per size, at the streamed block's own shape ``(B, d) x (d, m)``; ``exp`` per second (a
fused ``sum(exp(x))`` over a large array, so that no output is written); memory bandwidth (a read-only
sum and a copy of a large array; the copy also pays for its fresh output). Each row's floor is the least time an
iteration could take on this machine for that plan, and ``percent_of_floor`` is that time over the
measured one (above 100% when the working set fits in the caches, which the floors' arrays do not):

* ``stream``: ``2 n m d`` flops at the block-shaped GEMM rate (the cost product; the exps are extra);
* ``dense``: two passes over the stored ``n x m`` float32 kernel at the read bandwidth;
* ``ott``: ``2 n m`` exps (two log-sum-exp updates, the cost being recomputed) at the exp rate;
* ``pot``: the same exp floor, but only when JAX runs on the host CPU (else no floor: NumPy on the
  host against a device floor would compare nothing).

**Memory.** A plan whose estimate (:func:`sotjax.plan.estimate_bytes`) exceeds the budget is skipped
with the reason in its row, before anything is allocated; the budget is 60% of the accelerator's
memory (of the host's available memory on CPU) unless given.

**Precision.** ``jax_default_matmul_precision`` is recorded: on A100/H100 the default float32 matmul
runs in TF32, with which float32 Sinkhorn stops converging (ott-jax issue 496). ``sotjax bench``
sets it to ``"highest"`` unless told otherwise; the streamed cost always runs at ``HIGHEST``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sotjax.errors import SotjaxInputError

#: plans in the order they are measured and shown
PLANS: tuple[str, ...] = ("dense", "dense-bf16", "stream", "ott", "pot")
PLAN_LABELS: dict[str, str] = {
    "dense": "sotjax dense",
    "dense-bf16": "sotjax dense-bf16",
    "stream": "sotjax stream",
    "ott": "ott-jax dense PointCloud",
    "pot": "POT (NumPy, log)",
}
#: the issue's grid (``sotjax bench --full``; the command keeps a copy, :mod:`sotjax.commands.bench`)
FULL_GRID: dict[str, tuple[int, ...]] = {"n": (10_000, 100_000, 1_000_000), "m": (50, 5000), "d": (64, 384, 768)}
#: the default grid: the smallest n with every m and d (a few minutes on a 2-core CPU)
QUICK_GRID: dict[str, tuple[int, ...]] = {"n": (10_000,), "m": (50, 5000), "d": (64, 384, 768)}
#: a stopping threshold no error can reach (errors are >= 0): every solve runs exactly its iterations.
#: On random high-dimensional data the marginal error reaches exactly 0 within a few iterations, so a
#: threshold of 0 would stop early and the per-iteration differences would measure nothing.
NEVER = -1.0
#: iterations of the short solve whose time is subtracted from the long one
WARMUP_ITERATIONS = 2
#: POT runs in NumPy on the host: above this many pairs one iteration takes minutes, so it is skipped
POT_MAX_PAIRS = 10**8
#: host bytes per pair of POT's log-domain solve (float64 cost and about four n x m temporaries)
POT_BYTES_PER_PAIR = 40
#: after a call this slow (seconds), a timing is not repeated
SLOW_CALL_SECONDS = 5.0
#: timed iterations shorter than this (seconds) are too noisy: their number is raised (per_iteration)
MIN_TIMED_SECONDS = 0.1
#: the most timed iterations that raising may reach
MAX_TIMED_ITERATIONS = 2000


@dataclasses.dataclass(frozen=True)
class Size:
    """One benchmark size: ``n`` corpus rows, ``m`` reference rows, dimension ``d``."""

    n: int
    m: int
    d: int


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per Sinkhorn iteration, the warm-up (compile) seconds, the iterations timed, a note."""

    seconds_per_iteration: float
    compile_seconds: float
    iterations: int
    note: str = ""


def grid(n: Iterable[int], m: Iterable[int], d: Iterable[int]) -> list[Size]:
    """Every ``(n, m, d)`` combination, in that nesting order."""
    return [Size(int(a), int(b), int(c)) for a in n for b in m for c in d]


def pairs_per_second(n: int, m: int, seconds_per_iteration: float) -> float:
    """Corpus-reference pair evaluations per second: one iteration touches all ``n m`` pairs."""
    return n * m / seconds_per_iteration


# --------------------------------------------------------------------------------------- machine


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_memory_bytes(device: Any = None) -> int | None:
    """The accelerator's memory limit (None on CPU or when the backend does not say)."""
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats() or {}
    except Exception:  # not every backend implements memory_stats
        return None
    limit = stats.get("bytes_limit")
    return int(limit) if limit else None


def default_budgets() -> tuple[int, int]:
    """``(device budget, host budget)``: 60% of the accelerator's memory (the host's on CPU) and 60%
    of the host's available memory (what POT, on the host, may use)."""
    from sotjax.plan import default_budget_bytes

    host = default_budget_bytes()
    return default_budget_bytes(device_memory_bytes()), host


def machine_info() -> dict[str, Any]:
    """Device, library versions, matmul precision, CPU and load of this run."""
    from sotjax.plan import available_memory_bytes

    devices = jax.devices()
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "devices": [str(dev) for dev in devices],
        "device_memory_bytes": device_memory_bytes(devices[0]),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "ott": _version("ott-jax"),
        "pot": _version("pot"),
        "numpy": np.__version__,
        "sotjax": _version("sotjax"),
        "python": platform.python_version(),
        "jax_default_matmul_precision": matmul_precision(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "load_average": load,
        "host_memory_available_bytes": available_memory_bytes(),
    }


def matmul_precision() -> str | None:
    """The current ``jax_default_matmul_precision`` (None: unset, i.e. the backend's default)."""
    value = jax.config.jax_default_matmul_precision  # type: ignore[attr-defined]
    return None if value is None else str(value)


def set_matmul_precision(name: str | None) -> None:
    """Set ``jax_default_matmul_precision`` (``"highest"``, ``"high"``, ``"default"``; None: unset)."""
    jax.config.update("jax_default_matmul_precision", name)


# ---------------------------------------------------------------------------------------- timing


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(fn: Callable[[], Any], repeats: int = 2) -> float:
    """The fastest of up to ``repeats`` timed calls (fewer once they add up to a slow call)."""
    times = [_seconds(fn)]
    while len(times) < repeats and sum(times) < SLOW_CALL_SECONDS:
        times.append(_seconds(fn))
    return min(times)


def per_iteration(run: Callable[[int], Any], iterations: int, repeats: int = 2, warm: bool = True,
                  min_seconds: float = MIN_TIMED_SECONDS) -> Timing:
    """Seconds per iteration of ``run(k)`` (a solve forced to ``k`` iterations, blocking until done).

    ``run`` is called once per iteration count to warm up (compile) unless ``warm`` is False, then
    timed; see the module docstring. When the timed iterations last less than ``min_seconds`` (small
    problems, where timer and dispatch noise would dominate), their number is raised once so that they
    last about that long (at most :data:`MAX_TIMED_ITERATIONS`; one more compile), and
    :attr:`Timing.iterations` says how many were timed. When the difference is still within timing
    noise, the long solve's time per iteration is reported instead, an upper bound, and the note says so.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    short = WARMUP_ITERATIONS
    compile_seconds = 0.0

    def measure(k: int) -> float:
        nonlocal compile_seconds
        call = functools.partial(run, k)
        if warm:
            compile_seconds += _seconds(call)
        return best_of(call, repeats)

    t_short, t_long = measure(short), measure(short + iterations)
    diff = t_long - t_short
    if diff < min_seconds and iterations < MAX_TIMED_ITERATIONS:
        estimate = diff / iterations if diff > 0 else t_long / (short + iterations)
        wanted = math.ceil(1.2 * min_seconds / max(estimate, 1e-9))
        iterations = int(min(MAX_TIMED_ITERATIONS, max(2 * iterations, wanted)))
        t_long = measure(short + iterations)
        diff = t_long - t_short
    if diff > 0:
        return Timing(diff / iterations, compile_seconds, iterations)
    return Timing(t_long / (short + iterations), compile_seconds, iterations,
                  "within timing noise: the long solve's time per iteration (an upper bound)")


# ------------------------------------------------------------------------------------------ data


def unit_rows(key: jax.Array, rows: int, d: int) -> jax.Array:
    """``rows`` random float32 unit vectors of dimension ``d``."""
    x = jax.random.normal(key, (rows, d), jnp.float32)
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


def uniform(rows: int) -> jax.Array:
    return jnp.full((rows,), 1.0 / rows, jnp.float32)


# ------------------------------------------------------------------------------------- the plans


def dense_seconds(x: jax.Array, y: jax.Array, epsilon: float, iterations: int, repeats: int = 2) -> Timing:
    """sotjax's dense plan (kernel mode: ``C`` and ``K`` stored): seconds per Sinkhorn iteration."""
    from sotjax.geometry import cosine_geometry
    from sotjax.transport import Potentials, SinkhornSettings, solve_sinkhorn

    n, m = x.shape[0], y.shape[0]
    geom, _ = cosine_geometry(x, y, epsilon, lse_mode="kernel")
    a, b = uniform(n), uniform(m)
    init = Potentials(jnp.zeros((n,), jnp.float32), jnp.zeros((m,), jnp.float32))

    @functools.partial(jax.jit, static_argnums=4)  # one program per iteration count, compiled at warm-up
    def solve(g, a, b, init, k):
        settings = SinkhornSettings(threshold=NEVER, max_iterations=k, newton_fallback=False)
        return solve_sinkhorn(g, a, b, init, settings)[0].f

    return per_iteration(lambda k: jax.block_until_ready(solve(geom, a, b, init, k)), iterations, repeats)


def ott_seconds(x: jax.Array, y: jax.Array, epsilon: float, iterations: int, repeats: int = 2) -> Timing:
    """ott-jax's ``Sinkhorn`` (log mode) on a dense ``PointCloud``: seconds per iteration.

    The point cloud's squared-Euclidean cost of unit rows is ``2 C``; at ``2 epsilon`` the problem
    is the cosine one the other plans solve.
    """
    from ott.geometry import pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn

    pc = pointcloud.PointCloud(x, y, epsilon=2.0 * epsilon)
    a, b = uniform(x.shape[0]), uniform(y.shape[0])

    @functools.partial(jax.jit, static_argnums=3)
    def solve(g, a, b, k):
        solver = sinkhorn.Sinkhorn(threshold=NEVER, min_iterations=k, max_iterations=k, inner_iterations=1)
        return solver(linear_problem.LinearProblem(g, a, b)).f

    return per_iteration(lambda k: jax.block_until_ready(solve(pc, a, b, k)), iterations, repeats)


def stream_seconds(x: jax.Array, y: jax.Array, epsilon: float, block_rows: int, iterations: int,
                   repeats: int = 2) -> Timing:
    """sotjax's streamed plan (blocks of ``block_rows`` corpus rows): seconds per Sinkhorn iteration."""
    from sotjax import streaming

    m = y.shape[0]
    geom = streaming.streamed_cosine(x, y, block_rows, epsilon)
    a, b = uniform(x.shape[0]), uniform(m)
    solve = jax.jit(streaming.sinkhorn, static_argnames=("max_iterations",))
    eps, never, g0 = jnp.float32(epsilon), jnp.float32(NEVER), jnp.zeros((m,), jnp.float32)

    def run(k: int) -> None:
        jax.block_until_ready(solve(geom, a, b, eps, g0, never, max_iterations=k).f)

    return per_iteration(run, iterations, repeats)


def bf16_seconds(x: jax.Array, y: jax.Array, epsilon: float, block_rows: int, iterations: int,
                 repeats: int = 2) -> Timing:
    """sotjax's dense-bf16 plan (the bfloat16 kernel in blocks of ``block_rows`` rows, built once outside
    the timing): seconds per Sinkhorn iteration."""
    from sotjax import streaming

    m, n = y.shape[0], x.shape[0]
    rows = -(-n // block_rows) * block_rows
    x_pad = jnp.pad(x, ((0, rows - n), (0, 0)))
    geom, _ = streaming.stored_kernel(x_pad, y, block_rows, epsilon, rows=n)
    a = jnp.concatenate([uniform(n), jnp.zeros((rows - n,), jnp.float32)])
    b = uniform(m)
    solve = jax.jit(streaming.sinkhorn, static_argnames=("max_iterations",))
    eps, never, g0 = jnp.float32(epsilon), jnp.float32(NEVER), jnp.zeros((m,), jnp.float32)

    def run(k: int) -> None:
        jax.block_until_ready(solve(geom, a, b, eps, g0, never, max_iterations=k).f)

    return per_iteration(run, iterations, repeats)


def pot_seconds(x: np.ndarray, y: np.ndarray, epsilon: float, iterations: int, repeats: int = 1) -> Timing:
    """POT's log-domain ``ot.sinkhorn`` in NumPy float64 on the host: seconds per iteration.

    Raises :class:`ImportError` when POT is not installed. Nothing compiles, so there is no warm-up.
    """
    import ot

    n, m = x.shape[0], y.shape[0]
    cost = np.clip(1.0 - x.astype(np.float64) @ y.astype(np.float64).T, 0.0, 2.0)
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)

    def run(k: int) -> None:
        with warnings.catch_warnings():  # "did not converge": the point of a forced solve
            warnings.simplefilter("ignore")
            ot.sinkhorn(a, b, cost, epsilon, method="sinkhorn_log", numItermax=k, stopThr=NEVER)

    return per_iteration(run, iterations, repeats, warm=False)


# ---------------------------------------------------------------------------------------- floors


def gemm_flops(rows: int, inner: int, cols: int, repeats: int = 3, key: int = 0) -> float:
    """Float32 GEMM FLOP/s (``Precision.HIGHEST``) of ``(rows, inner) x (inner, cols)``."""
    k1, k2 = jax.random.split(jax.random.key(key))
    p = jax.random.normal(k1, (rows, inner), jnp.float32)
    q = jax.random.normal(k2, (cols, inner), jnp.float32)
    mm = jax.jit(lambda p, q: jnp.matmul(p, q.T, precision=jax.lax.Precision.HIGHEST))
    def call() -> None:
        jax.block_until_ready(mm(p, q))

    call()  # compile
    return 2.0 * rows * inner * cols / best_of(call, repeats)


def _array(nbytes: int) -> jax.Array:
    return jax.random.uniform(jax.random.key(1), (max(1, nbytes // 4),), jnp.float32, -1.0, 1.0)


def _rate(fn: Callable[[jax.Array], jax.Array], big: jax.Array, repeats: int) -> float:
    """Seconds of ``fn(big)``, compiled first."""
    compiled = jax.jit(fn)
    def call() -> None:
        jax.block_until_ready(compiled(big))

    call()
    return best_of(call, repeats)


def default_floor_sizes(platform_name: str | None = None) -> tuple[int, int]:
    """``(square GEMM size, array bytes)`` of the floors: small enough for a CPU, large enough to
    leave the caches of an accelerator."""
    platform_name = jax.default_backend() if platform_name is None else platform_name
    return (2048, 64 << 20) if platform_name == "cpu" else (8192, 1 << 30)


def measure_floors(gemm_size: int | None = None, array_bytes: int | None = None, repeats: int = 3
                   ) -> dict[str, Any]:
    """The machine's floors: GEMM FLOP/s (square, HIGHEST), exp/s, read and copy bandwidth (bytes/s)."""
    default_gemm, default_bytes = default_floor_sizes()
    gemm_size = default_gemm if gemm_size is None else int(gemm_size)
    array_bytes = default_bytes if array_bytes is None else int(array_bytes)
    big = _array(array_bytes)
    nbytes = big.size * 4
    out = {
        "gemm_flops": gemm_flops(gemm_size, gemm_size, gemm_size, repeats),
        "gemm_shape": [gemm_size, gemm_size, gemm_size],
        "gemm_precision": "highest",
        "exp_per_s": big.size / _rate(lambda v: jnp.sum(jnp.exp(v)), big, repeats),
        "read_bytes_per_s": nbytes / _rate(jnp.sum, big, repeats),
        "copy_bytes_per_s": 2 * nbytes / _rate(lambda v: v + 1.0, big, repeats),
        "array_bytes": nbytes,
    }
    del big
    return out


def _floor(plan: str, size: Size, floors: dict[str, Any], block_gemm_flops: float | None, on_cpu: bool
           ) -> tuple[str | None, float | None, float | None]:
    """``(floor name, its rate, least seconds per iteration)`` of a plan at a size (module docstring)."""
    n, m, d = size.n, size.m, size.d
    if plan == "stream" and block_gemm_flops:
        return "gemm", block_gemm_flops, 2.0 * n * m * d / block_gemm_flops
    if plan == "dense" and floors.get("read_bytes_per_s"):
        rate = floors["read_bytes_per_s"]
        return "memory", rate, 2.0 * 4 * n * m / rate
    if plan == "dense-bf16" and floors.get("read_bytes_per_s"):  # two passes over a 2-byte kernel
        rate = floors["read_bytes_per_s"]
        return "memory", rate, 2.0 * 2 * n * m / rate
    if (plan == "ott" or (plan == "pot" and on_cpu)) and floors.get("exp_per_s"):
        rate = floors["exp_per_s"]
        return "exp", rate, 2.0 * n * m / rate
    return None, None, None


# ------------------------------------------------------------------------------------------- run


def _row(size: Size, plan: str, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "n": size.n, "m": size.m, "d": size.d, "plan": plan, "label": PLAN_LABELS[plan],
        "status": "skipped", "reason": None, "seconds_per_iteration": None, "pairs_per_second": None,
        "iterations": None, "compile_seconds": None, "floor": None, "floor_rate": None,
        "floor_seconds_per_iteration": None, "percent_of_floor": None, "block_rows": None,
        "estimated_bytes": None, "note": "",
    }
    row.update(fields)
    return row


def _gib(nbytes: float) -> str:
    return f"{nbytes / (1 << 30):.2f} GiB"


def skip_reason(plan: str, size: Size, budget_bytes: int, host_budget_bytes: int, epsilon: float = 0.1
                ) -> tuple[str | None, int | None, int | None]:
    """``(why the plan is skipped or None, estimated bytes, streamed block rows)`` before any work."""
    from sotjax.plan import MIN_BLOCK_ROWS, estimate_bytes, plan_memory

    n, m, d = size.n, size.m, size.d
    over = "over the budget of"
    if plan in ("dense", "ott"):
        need = estimate_bytes("dense", n, (m,), d)
        if need > budget_bytes:
            return (f"does not fit: needs about {_gib(need)} (sotjax.plan estimate), {over} {_gib(budget_bytes)}",
                    need, None)
        return None, need, None
    if plan == "dense-bf16":
        try:
            chosen = plan_memory(n, (m,), d, budget_bytes=budget_bytes, kind="dense-bf16", epsilon=epsilon)
        except SotjaxInputError as err:
            return f"not run: {err}", None, None
        return None, chosen.estimated_bytes, chosen.block_rows
    if plan == "stream":
        try:
            chosen = plan_memory(n, (m,), d, budget_bytes=budget_bytes, kind="stream")
        except SotjaxInputError:
            need = estimate_bytes("stream", n, (m,), d, block_rows=MIN_BLOCK_ROWS)
            return f"does not fit: needs about {_gib(need)} even streamed, {over} {_gib(budget_bytes)}", need, None
        return None, chosen.estimated_bytes, chosen.block_rows
    if plan == "pot":
        if importlib.util.find_spec("ot") is None:
            return "POT is not installed (pip install pot)", None, None
        if n * m > POT_MAX_PAIRS:
            return f"n·m = {n * m:.3g} pairs > {POT_MAX_PAIRS:.0e}: minutes per iteration in NumPy", None, None
        need = POT_BYTES_PER_PAIR * n * m + 8 * (n + m) * d
        if need > host_budget_bytes:
            why = f"does not fit: needs about {_gib(need)} of host memory, {over} {_gib(host_budget_bytes)}"
            return why, need, None
        return None, need, None
    raise ValueError(f"unknown plan {plan!r}; expected one of {', '.join(PLANS)}")


def run_bench(sizes: Sequence[Size], plans: Sequence[str] = PLANS, *, iterations: int = 5, epsilon: float = 0.1,
              repeats: int = 2, budget_bytes: int | None = None, host_budget_bytes: int | None = None,
              floors: dict[str, Any] | None = None, seed: int = 0,
              on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """One row per ``(size, plan)``, in that order (see :func:`_row` for the fields).

    A plan that does not fit ``budget_bytes`` (``host_budget_bytes`` for POT; defaults:
    :func:`default_budgets`), or is not installed, gets a ``"skipped"`` row with its ``reason``;
    nothing is allocated for a size whose plans are all skipped. ``floors`` (from
    :func:`measure_floors`, measured here when None) give each row's ``percent_of_floor``.
    ``on_row`` is called with every row as soon as it is measured.
    """
    unknown = [p for p in plans if p not in PLANS]
    if unknown:
        raise ValueError(f"unknown plan(s) {unknown}; expected some of {', '.join(PLANS)}")
    if budget_bytes is None or host_budget_bytes is None:
        dev_default, host_default = default_budgets()
        budget_bytes = dev_default if budget_bytes is None else budget_bytes
        host_budget_bytes = host_default if host_budget_bytes is None else host_budget_bytes
    floors = measure_floors() if floors is None else floors
    on_cpu = jax.default_backend() == "cpu"
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    for index, size in enumerate(sizes):
        decisions = {plan: skip_reason(plan, size, budget_bytes, host_budget_bytes, epsilon) for plan in plans}
        x = y = None
        if any(reason is None for reason, _, _ in decisions.values()):
            kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(seed), index))
            x, y = unit_rows(kx, size.n, size.d), unit_rows(ky, size.m, size.d)
        for plan in plans:
            reason, need, block = decisions[plan]
            if reason is not None or x is None or y is None:
                emit(_row(size, plan, reason=reason, estimated_bytes=need))
                continue
            block_gemm = None
            try:
                if plan == "dense":
                    timing = dense_seconds(x, y, epsilon, iterations, repeats)
                elif plan == "ott":
                    timing = ott_seconds(x, y, epsilon, iterations, repeats)
                elif plan == "dense-bf16":
                    assert block is not None
                    timing = bf16_seconds(x, y, epsilon, block, iterations, repeats)
                elif plan == "stream":
                    assert block is not None
                    timing = stream_seconds(x, y, epsilon, block, iterations, repeats)
                    block_gemm = gemm_flops(min(block, size.n), size.d, size.m, repeats)
                else:
                    timing = pot_seconds(np.asarray(x), np.asarray(y), epsilon, iterations, repeats)
            except ImportError as err:  # an optional backend missing (or broken) at import time
                emit(_row(size, plan, reason=f"{PLAN_LABELS[plan]} could not be imported ({err})",
                          estimated_bytes=need))
                continue
            floor, rate, floor_seconds = _floor(plan, size, floors, block_gemm, on_cpu)
            seconds = timing.seconds_per_iteration
            emit(_row(
                size, plan, status="ok", seconds_per_iteration=seconds,
                pairs_per_second=pairs_per_second(size.n, size.m, seconds), iterations=timing.iterations,
                compile_seconds=timing.compile_seconds, floor=floor, floor_rate=rate,
                floor_seconds_per_iteration=floor_seconds,
                percent_of_floor=None if floor_seconds is None else 100.0 * floor_seconds / seconds,
                block_rows=block, estimated_bytes=need, note=timing.note,
            ))
        del x, y
    return rows


# ----------------------------------------------------------------------------------------- table

_COLUMNS = (("n", 9), ("m", 6), ("d", 5), ("plan", 26), ("ms/iter", 11), ("Mpairs/s", 10), ("floor", 7),
            ("% floor", 8))


def table_header() -> str:
    """The header line of :func:`format_row`'s fixed-width table (plus a rule)."""
    head = " ".join(f"{name:>{width}}" if i != 3 else f"{name:<{width}}" for i, (name, width) in enumerate(_COLUMNS))
    return f"{head}  note\n{'-' * (len(head) + 6)}"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def format_row(row: dict[str, Any]) -> str:
    """One fixed-width table line of a row (a skipped row shows its reason as the note)."""
    w = dict(_COLUMNS)
    seconds = row.get("seconds_per_iteration")
    pairs = row.get("pairs_per_second")
    cells = [
        f"{row['n']:>{w['n']}}", f"{row['m']:>{w['m']}}", f"{row['d']:>{w['d']}}",
        f"{row['label']:<{w['plan']}}",
        f"{_num(None if seconds is None else 1e3 * seconds, '.3f'):>{w['ms/iter']}}",
        f"{_num(None if pairs is None else pairs / 1e6, '.1f'):>{w['Mpairs/s']}}",
        f"{row.get('floor') or '-':>{w['floor']}}",
        f"{_num(row.get('percent_of_floor'), '.0f'):>{w['% floor']}}",
    ]
    if row["status"] != "ok":
        note = f"skipped: {row['reason']}"
    else:
        parts = [f"block {row['block_rows']}"] if row.get("block_rows") else []
        parts += [row["note"]] if row.get("note") else []
        note = "; ".join(parts)
    return " ".join(cells) + (f"  {note}" if note else "")


def format_floors(floors: dict[str, Any]) -> str:
    """One line with the floors."""
    size = floors.get("gemm_shape", ["?"])[0]
    return (f"floors: GEMM {floors['gemm_flops'] / 1e9:.1f} GFLOP/s (float32 HIGHEST, {size}^3), "
            f"exp {floors['exp_per_s'] / 1e9:.2f} G/s, read {floors['read_bytes_per_s'] / 1e9:.1f} GB/s, "
            f"copy {floors['copy_bytes_per_s'] / 1e9:.1f} GB/s")


def format_machine(info: dict[str, Any]) -> str:
    """One line with the device, versions and precision."""
    return (f"device: {info['device_kind']} x{info['device_count']} ({info['platform']}); jax {info['jax']}, "
            f"ott-jax {info['ott']}, POT {info['pot'] or 'not installed'}; "
            f"jax_default_matmul_precision={info['jax_default_matmul_precision']}; "
            f"CPU {info['cpu']} ({info['cores']} cores)")
