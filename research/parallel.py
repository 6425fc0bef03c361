"""The device mesh from the config, and the shardings of batches and state.

Axes are (data, fsdp, model). The batch is split over the mesh axes of the
`batch` sharding rule (data x fsdp by default); the train state is sharded by
the logical axis rules (research.sharding).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from research.config import MESH_AXES, ConfigError

BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Axis sizes with a -1 filled in so that their product is num_devices."""
  sizes = [mesh_config[axis] for axis in MESH_AXES]
  named = lambda: dict(zip(MESH_AXES, sizes, strict=True))
  if sizes.count(-1) > 1:
    raise ConfigError(f"config.mesh: at most one axis may be -1, got {named()}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(
        f"config.mesh={named()}: fixed axes ({known}) do not divide {num_devices} devices"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"config.mesh={named()}: product {math.prod(sizes)} != {num_devices} devices")
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def data_parallel_size(mesh: Mesh, batch_axes=BATCH_AXES) -> int:
  return math.prod(mesh.shape[axis] for axis in batch_axes)


def batch_sharding(mesh: Mesh, batch_axes=BATCH_AXES) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(tuple(batch_axes) or None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(
  local_batch: dict[str, np.ndarray], sharding: NamedSharding
) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays sharded over the batch axes."""
  return {
    key: jax.make_array_from_process_local_data(sharding, value)
    for key, value in local_batch.items()
  }
