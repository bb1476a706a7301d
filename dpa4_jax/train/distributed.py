"""Hosts, devices and the data-parallel mesh, with JAX's own runtime.

Training is data parallel: a one-axis ``Mesh`` named ``"data"`` over every
device of every host, parameters and optimizer state replicated, each global
batch a stack of equally padded sub-batches split along its leading axis. One
process runs per host (SLURM: one task per node); ``jax.distributed`` connects
them when the cluster environment says there are several.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

AXIS = "data"

# Environment variables that mean "one of several processes" (JAX's cluster detection reads them).
_CLUSTER_SIZE = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "JAX_NUM_PROCESSES")


def initialize() -> None:
    """``jax.distributed.initialize()`` when launched as several processes (SLURM ``srun``, ``mpirun``, or
    ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` set by hand); a no-op otherwise."""
    several = any(int(os.environ.get(k, "1") or 1) > 1 for k in _CLUSTER_SIZE)
    if not (several or os.environ.get("JAX_COORDINATOR_ADDRESS")) or jax.distributed.is_initialized():
        return
    # JAX reads JAX_COORDINATOR_ADDRESS itself but not the process count and index (jax 0.10): hand them over.
    by_hand = {name: int(os.environ[var]) for name, var in (("num_processes", "JAX_NUM_PROCESSES"),
                                                            ("process_id", "JAX_PROCESS_ID")) if var in os.environ}
    jax.distributed.initialize(**by_hand)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def is_main_process() -> bool:
    """Only process 0 writes checkpoints, logs metrics and draws plots."""
    return jax.process_index() == 0


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh over ``devices`` (all devices of all processes by default)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def split_along_data(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(AXIS))


def replicate(tree, mesh: Mesh):
    """Host (NumPy) or device arrays -> copies on every device of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))


def global_batch(local_batch, mesh: Mesh):
    """This process's sub-batches ``(G_local, ...)`` -> one global array ``(G, ...)`` split over the mesh."""
    sharding = split_along_data(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def to_host(tree):
    """Replicated arrays -> NumPy, without a cross-host gather (every process holds a full copy)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def local_sub_batches(global_count: int, mesh: Mesh) -> slice:
    """Which of a step's ``global_count`` sub-batches this process loads (a contiguous block)."""
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    if global_count % n_dev:
        raise ValueError(f"training.sub_batches={global_count} is not a multiple of the {n_dev} devices")
    per_process = global_count // n_proc
    start = jax.process_index() * per_process
    return slice(start, start + per_process)
