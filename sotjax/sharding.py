r"""The corpus axis over devices: one :class:`jax.sharding.Mesh` with axis ``"data"``.

Stage 1 has one long axis, the corpus rows (``n`` up to :math:`10^8`), against references of a few
thousand rows. Everything indexed by corpus row -- the unit embeddings, the cost/kernel rows of the
dense plan or the row blocks of the streamed plan, the logits, the optimiser state, the potentials
:math:`f` and the gradients -- is split over the mesh's ``"data"`` axis; the references and every
length-``m`` vector (potentials :math:`g`, column sums, the adjoint's CG iterates) are replicated.
The column reductions of Sinkhorn and of the plan products are then the only collectives: ``psum``
(and ``pmax`` for log-sum-exp) of length-``m`` vectors. The dense plan leaves their placement to
XLA's SPMD partitioner (the arrays carry :class:`~jax.sharding.NamedSharding`\ s); the streamed plan
runs its block scans in :func:`jax.shard_map` with explicit collectives
(:mod:`sotjax.streaming`). On several processes (:mod:`sotjax.distributed`) the mesh spans every
process's devices and the same code runs unchanged.

The row count is padded (:func:`sotjax.plan.padded_rows`) to a multiple of the device count (and of
the streamed block), with rows of zero mass: their logits are :math:`-\infty`, so their weight
``softmax`` is exactly 0 and their gradient is 0.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sotjax.errors import SotjaxInputError
from sotjax.streaming import AXIS


def corpus_mesh(devices: int = 0) -> Mesh | None:
    """A 1-D mesh over the first ``devices`` devices (0: all of them); None for one device (no
    sharding machinery at all). With several processes (:mod:`sotjax.distributed`), always every
    device of every process, ordered by process."""
    available = jax.devices()
    count = len(available) if devices == 0 else int(devices)
    if count > len(available):
        raise SotjaxInputError(f"--devices: {count} requested but only {len(available)} available"
                               f" ({available[0].platform})")
    if jax.process_count() > 1:
        if count != len(available):
            raise SotjaxInputError(f"--devices: a multi-process run uses every device of every process"
                                   f" ({len(available)}), got {count}")
        from sotjax.distributed import corpus_mesh as process_ordered_mesh  # noqa: PLC0415

        return process_ordered_mesh()  # each process's devices hold one contiguous block of rows
    if count <= 1:
        return None
    return Mesh(np.asarray(available[:count]), (AXIS,))


def mesh_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.devices.size)


def row_sharding(mesh: Mesh | None, ndim: int = 1) -> NamedSharding | None:
    """Rows split over the mesh (first axis), other axes whole; None without a mesh."""
    return None if mesh is None else NamedSharding(mesh, P(AXIS, *([None] * (ndim - 1))))


def replicated(mesh: Mesh | None) -> NamedSharding | None:
    return None if mesh is None else NamedSharding(mesh, P())


def put_rows(x, mesh: Mesh | None) -> jax.Array:
    """``x`` on the devices with its rows split (as is without a mesh). Host arrays are sliced per
    device (each device receives only its rows)."""
    if mesh is None:
        return jax.numpy.asarray(x)
    return jax.device_put(x, row_sharding(mesh, np.ndim(x)))


def put_replicated(x, mesh: Mesh | None) -> jax.Array:
    if mesh is None:
        return jax.numpy.asarray(x)
    return jax.device_put(x, replicated(mesh))
