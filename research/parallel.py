"""The device mesh from the config, and the shardings of batches and state.

Axes are (data, fsdp, model). The batch is split over the mesh axes of the
`batch` sharding rule (data x fsdp by default); the train state is sharded by
the logical axis rules (research.sharding).
"""

from __future__ import annotations

import math
import os

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


def num_slices(devices) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(mesh_config, devices=None) -> Mesh:
  """The (data, fsdp, model) mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(device_grid(mesh_config, devices), MESH_AXES)


def device_grid(mesh_config, devices) -> np.ndarray:
  """Devices arranged as (data, fsdp, model); on multi-slice TPU, `data` spans the slices."""
  from jax.experimental import mesh_utils

  shape = mesh_shape(mesh_config, len(devices))
  slices = num_slices(devices)
  if slices > 1:
    if shape[0] % slices:
      raise ConfigError(
        f"config.mesh.data={shape[0]}: must be a multiple of the {slices} TPU slices "
        "(data parallelism runs across slices)"
      )
    per_slice = (shape[0] // slices, *shape[1:])
    device_array = mesh_utils.create_hybrid_device_mesh(per_slice, (slices, 1, 1), devices)
  elif devices[0].platform == "tpu":
    device_array = mesh_utils.create_device_mesh(shape, devices)  # follows the ICI topology
  else:
    device_array = np.asarray(devices).reshape(shape)
  return device_array


def data_parallel_size(mesh: Mesh, batch_axes=BATCH_AXES) -> int:
  return math.prod(mesh.shape[axis] for axis in batch_axes)


def batch_sharding(mesh: Mesh, batch_axes=BATCH_AXES) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(tuple(batch_axes) or None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(
  local_batch: dict[str, np.ndarray], sharding: NamedSharding
) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays sharded over the batch axes.

  One process: a plain device_put (its rows are the global batch; ~25% less host
  time per step than the multi-process path, measured by research.bench).
  """
  if jax.process_count() == 1:
    return jax.device_put(local_batch, sharding)
  return {
    key: jax.make_array_from_process_local_data(sharding, value)
    for key, value in local_batch.items()
  }


class BatchFeeder:
  """The training batches of research.train's step, in one of two forms.

  `feeder.wrap(step_fn)` turns `step_fn(state, batch)` into `fn(state, *feeder(step))`,
  and `feeder.shardings` are the shardings of `feeder(step)`'s arguments:

  - Held on the device: a step-indexed in-memory dataset (loader.StepLoader) of at
    most `device_resident_mb` of arrays, whose pp_train ops all have a device form
    (preprocess.DevicePipeline: pad, crops, flip_lr), is put on every device once,
    with the example order of the epochs in use (the loader's permutations, sent
    once per epoch). The jitted step computes its batch's indices from
    `state.step` as the loader does, gathers the batch itself and applies the
    pipeline to it (the same bytes as the loader's), so a step sends nothing but
    the random ops' numbers (a few int32 values per example, drawn on the host as
    the loader draws them).
  - Fed from the host: the loader's rows. On one process they go to the jitted
    step as numpy arrays (jit's own transfer costs less host time than
    `jax.device_put`); on several, `global_batch` assembles them.

  research.bench measures both (config.data.device_resident_mb has the figures).
  """

  def __init__(self, loader, sharding: NamedSharding, device_resident_mb: float):
    from research.data import preprocess
    from research.data.loader import StepLoader

    self.loader, self.sharding = loader, sharding
    arrays = loader.arrays if isinstance(loader, StepLoader) else {}
    in_memory = all(isinstance(v, np.ndarray) for v in arrays.values())  # not lazy columns
    self.nbytes = sum(v.nbytes for v in arrays.values()) if in_memory else 0
    pipeline = loader.pipeline if arrays else None
    self.on_device = None  # the pipeline in the jitted step
    if pipeline is not None and in_memory and "inputs" in arrays:
      self.on_device = preprocess.DevicePipeline.of(pipeline, arrays["inputs"].shape[1:])
    self.device_resident = (
      bool(arrays)
      and in_memory
      and (pipeline is None or self.on_device is not None)
      and 0 < self.nbytes <= device_resident_mb * 2**20
      # a batch spans at most two epochs; positions in an epoch fit int32
      and loader.global_batch_size <= loader.num_examples
      and loader.global_batch_size * loader.num_examples < 2**31
    )
    self.shardings = (sharding,)
    self.numbers_per_step = False  # the random ops' numbers sent with each step
    self._gather = None  # batch()'s jitted gather, built on first use
    if self.device_resident:
      self.replicated = NamedSharding(sharding.mesh, PartitionSpec())
      # Rows as (N, features): XLA's CPU gather copies whole rows of a 2-D array
      # ~3.5x faster than the same rows of (N, 28, 28, 1) (50 vs 175 us, MNIST batch 128).
      self.row_shapes = {key: value.shape[1:] for key, value in arrays.items()}
      rows = {key: value.reshape(len(value), -1) for key, value in arrays.items()}
      self.arrays = jax.device_put(rows, self.replicated)
      self._orders = (None, None)  # (first epoch, its and the next epoch's order on device)
      self.numbers_per_step = self.on_device is not None and self.on_device.random
      self.shardings = (self.replicated,) * (3 if self.numbers_per_step else 2)

  def gather(self, step, arrays, orders, numbers=None) -> dict[str, jax.Array]:
    """(Traced) the global batch of `step` from the arrays on the device: the indices
    of loader.StepLoader.global_indices, computed in int32 without overflow, then
    the pipeline with this step's numbers (`numbers`: those of the call's steps)."""
    import jax.numpy as jnp

    size, count = self.loader.global_batch_size, self.loader.num_examples
    # position = step * size + i = (q * count + r) * size + i, with step = q * count + r
    q, r = jnp.divmod(jnp.asarray(step, jnp.int32), count)
    epoch_in_step, offset = jnp.divmod(r * size + jnp.arange(size, dtype=jnp.int32), count)
    epoch = q * size + epoch_in_step
    indices = orders["permutations"][epoch - orders["first_epoch"], offset]
    batch = {
      key: value[indices].reshape((size,) + self.row_shapes[key]) for key, value in arrays.items()
    }
    if self.on_device is not None:
      drawn = None if numbers is None else numbers["rows"][step - numbers["first_step"]]
      batch["inputs"] = self.on_device(batch["inputs"], drawn)
    return {
      key: jax.lax.with_sharding_constraint(value, self.sharding) for key, value in batch.items()
    }

  def wrap(self, step_fn):
    """`step_fn(state, batch)` as a function of `(state, *self(step))`."""
    if not self.device_resident:
      return step_fn

    def gather_and_step(state, arrays, orders, *numbers):
      return step_fn(state, self.gather(state.step, arrays, orders, *numbers))

    return gather_and_step

  def batch(self, step: int) -> dict[str, jax.Array]:
    """The global batch of `step` as device arrays (for tests and tools)."""
    if not self.device_resident:
      return global_batch(self.loader(step), self.sharding)
    if self._gather is None:
      self._gather = jax.jit(self.gather, out_shardings=self.sharding)
    return self._gather(np.int32(step), *self(step))

  def __call__(self, step: int, steps: int = 1) -> tuple:
    """The arguments after the state of the wrapped step for a call of `steps` steps
    from `step` (several: the data held on the device, train.repeated)."""
    if not self.device_resident:
      rows = self.loader(step)
      return (rows if jax.process_count() == 1 else global_batch(rows, self.sharding),)
    epoch = step * self.loader.global_batch_size // self.loader.num_examples
    if self._orders[0] != epoch:  # once per epoch: this epoch's order and the next's
      permutations = np.stack(
        [self.loader.epoch_permutation(e).astype(np.int32) for e in (epoch, epoch + 1)]
      )
      orders = {"first_epoch": np.int32(epoch), "permutations": permutations}
      # every process computes the same orders: placed like the arrays in __init__
      self._orders = (epoch, jax.device_put(orders, self.replicated))
    if not self.numbers_per_step:
      return (self.arrays, self._orders[1])
    seed, size = self.loader.seed, self.loader.global_batch_size
    rows = [self.on_device.numbers(seed, s, size) for s in range(step, step + steps)]
    numbers = {"first_step": np.int32(step), "rows": np.stack(rows)}
    if jax.process_count() > 1:  # every process drew the same numbers
      numbers = jax.device_put(numbers, self.replicated)
    return (self.arrays, self._orders[1], numbers)


# --- Multi-process.

COORDINATOR_ENV = "RESEARCH_COORDINATOR"  # host:port of process 0
NUM_PROCESSES_ENV = "RESEARCH_NUM_PROCESSES"
PROCESS_ID_ENV = "RESEARCH_PROCESS_ID"


def _cluster_detected() -> str | None:
  """'slurm' or 'tpu' when running as one task of a multi-process job there."""
  if os.environ.get("RESEARCH_DISTRIBUTED") == "auto":  # set by launch/tpu_vm.sh
    return "auto"
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
    return "slurm"
  if len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
    return "tpu"
  return None


def initialize_distributed(
  coordinator_address: str = "", num_processes: int = 0, process_id: int = -1, timeout_s: int = 300
) -> None:
  """jax.distributed.initialize from flags, else $RESEARCH_* variables, else SLURM / Cloud TPU.

  A single process (none of these set) initialises nothing.
  """
  coordinator_address = coordinator_address or os.environ.get(COORDINATOR_ENV, "")
  num_processes = num_processes or int(os.environ.get(NUM_PROCESSES_ENV, "0"))
  if process_id < 0:
    process_id = int(os.environ.get(PROCESS_ID_ENV, "-1"))
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(
        f"multi-process launch: coordinator {coordinator_address!r} needs num_processes >= 1 "
        f"and 0 <= process_id < num_processes (got {num_processes}, {process_id})"
      )
    jax.distributed.initialize(
      coordinator_address, num_processes, process_id, initialization_timeout=timeout_s
    )
  elif _cluster_detected():
    jax.distributed.initialize(initialization_timeout=timeout_s)  # JAX reads the cluster's env


def barrier(name: str, timeout_s: int = 600) -> None:
  """Waits for every process; on timeout, raises naming the processes that did not arrive."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # the coordination client: barriers with timeouts

  client = distributed.global_state.client
  client.key_value_set(f"barrier/{name}/{jax.process_index()}", "arrived")
  try:
    client.wait_at_barrier(f"barrier/{name}", timeout_in_ms=timeout_s * 1000)
  except Exception as e:  # noqa: BLE001  the client raises XlaRuntimeError subclasses
    arrived = {key.rsplit("/", 1)[-1] for key, _ in client.key_value_dir_get(f"barrier/{name}/")}
    late = [p for p in range(jax.process_count()) if str(p) not in arrived]
    raise RuntimeError(
      f"barrier {name!r} timed out after {timeout_s}s: process(es) {late} did not arrive ({e})"
    ) from None
