r"""Multi-process runs on JAX's own runtime: ``jax.distributed`` + one global mesh, no cluster code of ours.

One ``sotjax weigh`` process runs per host (or per accelerator group), all started with the same
``--coordinator HOST:PORT --num-processes N`` and their own ``--process-id I`` (or the environment
variables of :meth:`DistributedConfig.from_env`). Then:

1. :func:`initialize` calls :func:`jax.distributed.initialize` **before any other JAX call** (JAX
   refuses it once a backend exists): process 0 starts the coordination service on ``PORT``, every
   process registers with it, and from then on :func:`jax.devices` lists the devices of *all*
   processes. On CPU the cross-process collectives are Gloo over TCP (JAX's default
   ``jax_cpu_collectives_implementation="gloo"``; nothing to set); GPUs use NCCL and TPUs ICI.
2. :func:`corpus_mesh` is a 1-D mesh (axis ``"data"``) over those devices, process by process, so
   each process owns one contiguous block of the padded corpus rows.
3. Each process memory-maps the ``.npy`` inputs and copies only its own rows
   (:func:`process_row_range`, :func:`load_rows`): no process ever holds the whole corpus.
4. :func:`global_rows` assembles those per-process rows into one global :class:`jax.Array`
   (:func:`jax.make_array_from_process_local_data`): to jitted code (:mod:`sotjax.streaming`,
   :mod:`sotjax.sharding`) it is an ordinary row-sharded array, and its ``psum``/``pmax`` over
   ``"data"`` now cross processes.
5. :func:`allgather_rows` brings a row-sharded result (the weights) to every host, and only the
   writer (:func:`is_writer`, process 0) writes the run directory.

**Failure behaviour of JAX's runtime** (measured on jax 0.10.2, CPU), which shapes this module:

* A coordinator that never answers, a peer that never registers, or a peer that dies (missed
  heartbeats) does not raise a Python exception: JAX's client *aborts the process* (``SIGABRT``,
  a ``DEADLINE_EXCEEDED``/``UNAVAILABLE`` log line). :func:`initialize` therefore checks what it
  can first and raises one-line :class:`SotjaxRuntimeError`\ s: a non-zero process waits (bounded)
  for the coordinator's port to accept connections; process 0 checks that the port is free (a busy
  port makes JAX *segfault*).
* If one process stops on an error while the others enter a collective, the others block in it
  and the stopped process waits at JAX's shutdown barrier until ``shutdown_timeout_s``, then all
  abort. Errors found by one process (e.g. a NaN in its rows) must be agreed on before any
  collective: :func:`raise_together` makes every process raise, so all exit promptly.

Padding: a global array needs equal shards, so every process's block has the same number of rows;
the row count is padded *at the end* (global row ``i`` is input row ``i``; rows ``n..`` are padding),
exactly as the single-process path pads (:func:`sotjax.plan.padded_rows`). Padding rows are zeros
and must carry zero mass (logit :math:`-\infty`), so they change nothing and are cut off after
:func:`allgather_rows` (``[:n]``).

Importing this module is cheap (jax is imported on first use), so the CLI can parse the flags
(:class:`DistributedConfig`) before deciding anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sotjax.errors import SotjaxInputError, SotjaxRuntimeError, shorten
from sotjax.io import check_input_file, error_text, open_npy

if TYPE_CHECKING:
    import jax
    from jax.sharding import Mesh

#: the mesh axis the corpus rows are split over (the same name as :data:`sotjax.streaming.AXIS`)
AXIS = "data"
#: seconds a process waits for the others to connect (JAX's own default is 300: schedulers may
#: start hosts minutes apart)
DEFAULT_INIT_TIMEOUT_S = 300
#: seconds without a heartbeat after which JAX declares a process dead and aborts the others
DEFAULT_HEARTBEAT_TIMEOUT_S = 100
#: seconds a finished process waits at JAX's shutdown barrier for the others to finish
DEFAULT_SHUTDOWN_TIMEOUT_S = 300

# Environment variables, in order of precedence after the command-line flags. JAX itself reads only
# JAX_COORDINATOR_ADDRESS (plus JAX_COORDINATOR_PORT/BIND_ADDRESS/LOCAL_DEVICE_IDS and Slurm/Open MPI
# auto-detection); it has no JAX_NUM_PROCESSES or JAX_PROCESS_ID, so neither does sotjax.
ENV_COORDINATOR = "SOTJAX_COORDINATOR"
ENV_NUM_PROCESSES = "SOTJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SOTJAX_PROCESS_ID"
JAX_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"

FLAG_COORDINATOR = "--coordinator"
FLAG_NUM_PROCESSES = "--num-processes"
FLAG_PROCESS_ID = "--process-id"

# what the process is connected to after initialize(): the config, or None (single process)
_initialized: DistributedConfig | None = None


# ------------------------------------------------------------------------------------ configuration
def parse_address(address: str, name: str = FLAG_COORDINATOR) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[v6]:PORT"`` for IPv6) as ``(host, port)``; one-line error naming ``name``."""
    text = address.strip()
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or any(c.isspace() for c in host) or not (port_text.isascii() and port_text.isdigit()):
        raise SotjaxInputError(f"{name} must be HOST:PORT (e.g. 10.0.0.1:12345), got {shorten(address)}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise SotjaxInputError(f"{name}: port must be in [1, 65535], got {shorten(port)}")
    return host, port


def _validate(coordinator: str | None, num_processes: int | None, process_id: int | None,
              names: tuple[str, str, str]) -> None:
    """The checks of :class:`DistributedConfig`, with messages naming ``names`` (flags or variables)."""
    c_name, n_name, i_name = names
    given = (coordinator is not None, num_processes is not None, process_id is not None)
    if any(given) and not all(given):
        missing = ", ".join(name for name, g in zip(names, given, strict=True) if not g)
        raise SotjaxInputError(f"{c_name}, {n_name} and {i_name} go together (all or none); missing {missing}")
    if coordinator is None or num_processes is None or process_id is None:
        return
    parse_address(coordinator, c_name)
    for name, value in ((n_name, num_processes), (i_name, process_id)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SotjaxInputError(f"{name} must be an integer, got {shorten(value)}")
    if num_processes < 1:
        raise SotjaxInputError(f"{n_name} must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise SotjaxInputError(f"{i_name} must be in [0, {num_processes}) for {n_name} {num_processes}, "
                               f"got {process_id}")


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise SotjaxInputError(f"{name} must be an integer, got {shorten(raw)}") from None


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    r"""Which process of how many this is, and where process 0's coordinator listens.

    All three fields are given together or not at all (all ``None``: a single-process run). The
    checks raise one-line :class:`SotjaxInputError`\ s naming the command-line flag.
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self) -> None:
        _validate(self.coordinator, self.num_processes, self.process_id,
                  (FLAG_COORDINATOR, FLAG_NUM_PROCESSES, FLAG_PROCESS_ID))

    @property
    def is_multi_process(self) -> bool:
        """More than one process: :func:`initialize` has something to do."""
        return self.num_processes is not None and self.num_processes > 1

    @property
    def address(self) -> tuple[str, int]:
        """The coordinator's ``(host, port)`` (only for a multi-process config)."""
        if self.coordinator is None:
            raise ValueError("a single-process config has no coordinator")
        return parse_address(self.coordinator)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DistributedConfig:
        """The config from ``SOTJAX_COORDINATOR``, ``SOTJAX_NUM_PROCESSES`` and ``SOTJAX_PROCESS_ID``.

        ``JAX_COORDINATOR_ADDRESS`` (the one of these JAX reads itself) stands in for the coordinator,
        but only when a process count is set: on its own it is left to JAX (a cluster launcher may
        set it) and the run is single-process. Unset or empty variables are ``None``; messages name
        the variable.
        """
        return cls.resolve(environ=environ)

    @classmethod
    def resolve(cls, coordinator: str | None = None, num_processes: int | None = None,
                process_id: int | None = None, environ: Mapping[str, str] | None = None) -> DistributedConfig:
        """Command-line values, each falling back to its environment variable (:meth:`from_env`).

        A flag wins over its variable field by field, so a launcher may export the process id
        while the coordinator comes on the command line. Messages name where each value came from.
        """
        env = os.environ if environ is None else environ
        # an unset field is named by both its sources, a set one by where its value came from
        names = [f"{FLAG_COORDINATOR}/{ENV_COORDINATOR}" if coordinator is None else FLAG_COORDINATOR,
                 f"{FLAG_NUM_PROCESSES}/{ENV_NUM_PROCESSES}" if num_processes is None else FLAG_NUM_PROCESSES,
                 f"{FLAG_PROCESS_ID}/{ENV_PROCESS_ID}" if process_id is None else FLAG_PROCESS_ID]
        if num_processes is None and (value := _env_int(env, ENV_NUM_PROCESSES)) is not None:
            num_processes, names[1] = value, ENV_NUM_PROCESSES
        if process_id is None and (value := _env_int(env, ENV_PROCESS_ID)) is not None:
            process_id, names[2] = value, ENV_PROCESS_ID
        if coordinator is None:
            for var in (ENV_COORDINATOR, JAX_ENV_COORDINATOR):
                raw = env.get(var, "").strip()
                if raw and (var == ENV_COORDINATOR or num_processes is not None):
                    coordinator, names[0] = raw, var
                    break
        _validate(coordinator, num_processes, process_id, (names[0], names[1], names[2]))
        return cls(coordinator, num_processes, process_id)


# ------------------------------------------------------------------------------------ runtime setup
def _port_is_free(port: int) -> bool:
    """Whether the coordination service can listen on ``port`` (JAX binds ``[::]:PORT``)."""
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this host: try IPv4
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT is fine
            try:
                sock.bind((host, port))
            except OSError:
                return False
            return True
    return True  # no socket family at all: let JAX report it


def _wait_for_coordinator(host: str, port: int, timeout_s: float) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``timeout_s`` (polled)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(0.1, timeout_s))):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def initialize(cfg: DistributedConfig, *, timeout_s: int = DEFAULT_INIT_TIMEOUT_S,
               heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
               shutdown_timeout_s: int = DEFAULT_SHUTDOWN_TIMEOUT_S) -> None:
    """Join the run described by ``cfg`` (:func:`jax.distributed.initialize`); once per process.

    A single-process config does nothing. Calling again with the same config does nothing; with a
    different one it is an error (JAX's runtime cannot be re-joined). It must run before anything
    that starts a JAX backend (``jax.devices()``, any computation): afterwards JAX refuses, which
    is reported as one line too.

    JAX aborts the whole process, rather than raising, when the coordinator cannot be reached in
    ``timeout_s`` or its port is taken; the checks done here first turn the common cases into one
    :class:`SotjaxRuntimeError` line: process 0 checks the port is free, the others wait up to
    ``timeout_s`` for process 0 to listen. (Process 0 still aborts after ``timeout_s`` if a peer
    never registers: only JAX knows that.)
    """
    global _initialized
    if not cfg.is_multi_process:
        return
    if _initialized is not None:
        if _initialized == cfg:
            return
        raise SotjaxRuntimeError(f"this process already joined a run as process {_initialized.process_id} of "
                                 f"{_initialized.num_processes} at {_initialized.coordinator}")
    import jax

    host, port = cfg.address
    where = f"{FLAG_COORDINATOR} {cfg.coordinator}"
    if cfg.process_id == 0:
        if not _port_is_free(port):
            raise SotjaxRuntimeError(f"{where}: port {port} is already in use on this host (pick another port)")
    elif not _wait_for_coordinator(host, port, timeout_s):
        raise SotjaxRuntimeError(f"{where}: no coordinator answered within {timeout_s} s "
                                 f"(start process 0 with the same {FLAG_COORDINATOR}, check host and firewall)")
    try:
        jax.distributed.initialize(
            coordinator_address=(cfg.coordinator or "").strip(), num_processes=cfg.num_processes,
            process_id=cfg.process_id,
            initialization_timeout=int(timeout_s), heartbeat_timeout_seconds=int(heartbeat_timeout_s),
            shutdown_timeout_seconds=int(shutdown_timeout_s))
    except (RuntimeError, ValueError, TypeError) as err:
        raise SotjaxRuntimeError(f"{where}: jax.distributed.initialize failed ({error_text(err)})") from None
    _initialized = cfg


def is_writer() -> bool:
    """Whether this process writes shared outputs (the run directory): process 0, or a single process.

    Starts JAX's backend: call :func:`initialize` first.
    """
    import jax

    return jax.process_index() == 0


def raise_together(error: Exception | None) -> None:
    """Raise on every process if any process has an error (a collective: all processes must call it).

    A process that stops alone leaves the others blocked in their next collective until JAX's
    shutdown barrier times out and aborts them all (minutes). Each process passes the error it
    found (or ``None``); a process with an error re-raises it, the others raise one line naming
    the first failing process. Single-process: raises ``error`` if given.
    """
    import jax

    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    from jax.experimental import multihost_utils

    code = 0 if error is None else 1 if isinstance(error, SotjaxInputError) else 2
    codes = np.asarray(multihost_utils.process_allgather(np.asarray([code], np.int32), tiled=True))
    if error is not None:
        raise error
    failed = np.flatnonzero(codes)
    if failed.size:
        first = int(failed[0])
        kind = SotjaxInputError if codes[first] == 1 else SotjaxRuntimeError
        raise kind(f"process {first} of {codes.size} stopped with an error (see its output)")


def sum_over_processes(x: np.ndarray) -> np.ndarray:
    """The elementwise float64 sum of ``x`` over all processes (a collective: every process calls it
    with the same shape). Single-process: ``x`` itself.

    The float64 bits travel as uint32 pairs (no 64-bit JAX types needed) and every process adds the
    gathered parts in process order, so all processes get bit-identical sums.
    """
    import jax

    x = np.ascontiguousarray(x, dtype=np.float64)
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    bits = x.reshape(1, -1).view(np.uint32)
    gathered = np.ascontiguousarray(np.asarray(multihost_utils.process_allgather(bits, tiled=True)), np.uint32)
    return gathered.view(np.float64).sum(axis=0).reshape(x.shape)


def several_processes() -> bool:
    """Whether this process is one of several (``jax.distributed`` joined, by :func:`initialize` or a
    caller, with more than one process). Starts no JAX backend in a single-process run."""
    import jax

    return jax.distributed.is_initialized() and jax.process_count() > 1


@contextlib.contextmanager
def stop_together() -> Iterator[None]:
    """Leave a block that may fail on some processes only together: an error on any process raises on all.

    Every process must enter the block (it ends in :func:`raise_together`, a collective). The process
    that failed re-raises its own error; the others raise one line naming it. Only an ``Exception``
    is shared (Ctrl-C is not). Keep such a block short on every process: the first collective over a
    set of devices waits only about 30 s for the slowest process (Gloo's context setup on CPU).
    """
    error: Exception | None = None
    try:
        yield
    except Exception as err:  # shared with the other processes, then re-raised
        error = err
    raise_together(error)


# ------------------------------------------------------------------------------------ rows per process
def rows_per_process(n: int, process_count: int, multiple: int = 1) -> int:
    """Rows in each process's block: ``ceil(n / process_count)`` rounded up to ``multiple``.

    Global arrays need equal shards, so every block has this size (the last blocks hold fewer real
    rows, or none, and are filled with zero-mass padding). ``multiple`` is what one block must
    divide into: the process's device count, times the streamed block size if any.
    """
    if n < 0 or process_count < 1 or multiple < 1:
        raise ValueError(f"need n >= 0, process_count >= 1, multiple >= 1; got {n}, {process_count}, {multiple}")
    per = -(-n // process_count)
    return -(-per // multiple) * multiple


def process_row_range(n: int, process_index: int, process_count: int, multiple: int = 1, *,
                      padded: int | None = None) -> tuple[int, int]:
    """The input rows ``[start, stop)`` that process ``process_index`` owns (contiguous).

    The padded global row axis is cut into ``process_count`` equal blocks, in process order; a
    process owns the real rows (``< n``) of its block. The block size is
    :func:`rows_per_process` (``n`` spread as evenly as blocks of a ``multiple`` allow), or
    ``padded // process_count`` when the caller fixed the padded total ``padded`` (e.g.
    :func:`sotjax.plan.padded_rows` over all devices; a multiple of ``process_count * multiple``).
    Padding rows sit at the end of the global axis, so global row ``i`` is input row ``i``.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if padded is None:
        per = rows_per_process(n, process_count, multiple)
    else:
        if padded < n or padded % (process_count * multiple):
            raise ValueError(f"padded {padded} must be >= n = {n} and a multiple of "
                             f"{process_count} x {multiple}")
        per = padded // process_count
    start = min(process_index * per, n)
    return start, min(start + per, n)


def load_rows(path: str | os.PathLike, start: int, stop: int, dtype: Any = np.float32,
              dim: int | None = None) -> np.ndarray:
    r"""Rows ``[start, stop)`` of a 2-D float ``.npy`` file as a new ``dtype`` array (only those rows).

    The file is memory-mapped, so only the pages of these rows are read: each process of a run
    reads its own share of a corpus that no single host need hold. One-line
    :class:`SotjaxInputError`\ s name the file for: not a ``.npy`` file, not a 2-D float array,
    ``dim`` columns expected but others found, rows out of range, and non-finite values (NaN/inf, or
    too large for ``dtype``; the message gives the global row number).
    """
    file = check_input_file(path)
    if file.suffix.lower() != ".npy":
        raise SotjaxInputError(f"{file}: a multi-process run reads .npy inputs only (got '{file.suffix}')")
    x = open_npy(file)
    if dim is not None and x.shape[1] != dim:
        raise SotjaxInputError(f"{file}: rows have {x.shape[1]} values, expected {dim}")
    if not 0 <= start <= stop <= x.shape[0]:
        raise SotjaxInputError(f"{file}: rows [{start}, {stop}) out of range for {x.shape[0]} rows")
    raw = np.asarray(x[start:stop])
    with np.errstate(over="ignore"):
        rows = raw.astype(dtype, copy=True)  # a copy: the memory map is released when x goes
    del x
    if not np.all(np.isfinite(rows)):
        bad = int(np.argwhere(~np.isfinite(rows))[0, 0])
        what = "non-finite value (NaN or inf)" if not np.all(np.isfinite(raw[bad])) else \
            f"value too large for {np.dtype(dtype).name}"
        raise SotjaxInputError(f"{file}: {what} in row {start + bad}")
    return rows


# ------------------------------------------------------------------------------------ global arrays
def corpus_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh (axis ``"data"``) over ``devices`` (default: every device of every process).

    Devices are ordered by process, then id, so each process's devices form one contiguous run of
    the axis: a process's shards are one contiguous block of rows (what :func:`process_row_range`
    assumes). Every process must contribute the same number of devices (equal blocks).
    """
    import jax
    from jax.sharding import Mesh

    chosen = list(jax.devices() if devices is None else devices)
    if not chosen:
        raise SotjaxRuntimeError("no devices for the corpus mesh")
    chosen.sort(key=lambda d: (d.process_index, d.id))
    counts: dict[int, int] = {}
    for d in chosen:
        counts[d.process_index] = counts.get(d.process_index, 0) + 1
    if len(set(counts.values())) > 1:
        raise SotjaxRuntimeError(f"processes have different device counts {counts} (each needs the same number)")
    return Mesh(np.asarray(chosen), (AXIS,))


def _mesh_processes(mesh: Mesh) -> list[int]:
    """The process indices of ``mesh``'s devices, in mesh order, each once."""
    seen: list[int] = []
    for d in mesh.devices.flat:
        if d.process_index not in seen:
            seen.append(d.process_index)
    return seen


def _row_span(index: tuple[slice, ...] | None, n: int) -> tuple[int, int]:
    """``[start, stop)`` of the first axis of a device's index into an ``n``-row array."""
    start, stop, _ = (index[0] if index else slice(None)).indices(n)
    return start, stop


def global_rows(local: np.ndarray, mesh: Mesh, n_global_padded: int) -> jax.Array:
    """One global array of ``n_global_padded`` rows, split on its first axis over ``mesh``'s ``"data"``.

    Every process passes its own rows (``local``, from :func:`process_row_range` and
    :func:`load_rows`, possibly fewer than its block or none); they are zero-padded to the block
    size ``n_global_padded / processes`` and placed at the process's block. Each device receives
    only its shard: nothing crosses processes. Works for 1-D vectors too (masses: pad rows get 0).
    """
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    processes = _mesh_processes(mesh)
    me = jax.process_index()
    if me not in processes:
        raise SotjaxRuntimeError(f"process {me} has no device in the corpus mesh")
    if n_global_padded % mesh.devices.size:
        raise ValueError(f"n_global_padded {n_global_padded} is not a multiple of the {mesh.devices.size} devices")
    per = n_global_padded // len(processes)
    block = processes.index(me)
    local = np.asarray(local)
    if local.shape[0] > per:
        raise ValueError(f"process {me} has {local.shape[0]} rows for a block of {per}")
    if local.shape[0] < per:
        pad = np.zeros((per - local.shape[0], *local.shape[1:]), local.dtype)
        local = np.concatenate([local, pad])
    sharding = NamedSharding(mesh, P(AXIS, *([None] * (local.ndim - 1))))
    global_shape = (n_global_padded, *local.shape[1:])
    # the process's devices must cover exactly its block, else its rows would land elsewhere
    covered = sorted(_row_span(idx, n_global_padded)
                     for idx in sharding.addressable_devices_indices_map(global_shape).values())
    bounds = [block * per] + [b for span in covered for b in span] + [(block + 1) * per]
    if bounds[0::2] != bounds[1::2]:  # starts at the block, each shard starts where the last stopped
        raise SotjaxRuntimeError(f"process {me}'s devices do not hold one contiguous block of rows "
                                 f"(build the mesh with sotjax.distributed.corpus_mesh)")
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def allgather_rows(x: jax.Array) -> np.ndarray:
    """A full host copy of ``x`` on every process (a collective when ``x`` spans processes).

    A row-sharded global array is gathered (:func:`jax.experimental.multihost_utils.process_allgather`,
    ``tiled=True``: the global array, not a stack per process). An array this process holds
    entirely is copied as is (``process_allgather`` would *concatenate* the processes' copies).
    """
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (e.g. the writer finished the run directory)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
