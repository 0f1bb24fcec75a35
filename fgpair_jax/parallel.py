"""Data parallelism as current JAX does it: one `jax.jit` over a `("data",)` mesh of every device.

Parameters, optimiser state and the MoCo queue are replicated (`P()`); batches are split along their
leading axis (`P("data")`). XLA inserts the gradient all-reduce itself. There is no pmap, no
replicate/unreplicate: the same jitted step runs on one CPU, one GPU or a TPU pod slice, and on a pod
every host feeds only its own slice of the global batch (`global_batch`). Joining a multi-process job
(before any of this) is `distributed.py`'s.
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fgpair_jax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices of all processes, axis named `data`."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of values every device holds whole (params, optimiser state, queue, step)."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding of batches: leading axis split over the `data` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
    """One clear error instead of an XLA shape error deep inside the first step."""
    devices = mesh.devices.size
    if global_batch_size % devices:
        raise ConfigError(
            f"config.global_batch_size={global_batch_size} is not divisible by the {devices} devices of "
            f"the mesh; use a multiple of {devices}."
        )


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Assemble each process's slice of the batch into global arrays sharded over the mesh."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
