"""What training and evaluation both build from a config: mesh, data, model,
optimizer, the train state's layout on the mesh, and the initial state
(fresh, or loaded from another run's checkpoint for transfer learning).

    exp = experiment.build(config)      # loads the data: process 0 prepares it first
    state = experiment.initial_state(exp)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
import zlib
from typing import Any

from absl import logging

from research import config as config_lib
from research import registry


def rng_for(seed: int, name: str):
  """One seed, split by name: params, dropout, ... are independent streams."""
  import jax

  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))


def derived_values(config, num_train_examples: int) -> dict:
  steps_per_epoch = num_train_examples / config.global_batch_size
  if config.num_train_steps > 0:
    total_steps = config.num_train_steps
  else:
    total_steps = math.ceil(config.num_epochs * steps_per_epoch)
  return {
    "global_batch_size": config.global_batch_size,
    "num_train_examples": num_train_examples,
    "steps_per_epoch": steps_per_epoch,
    "total_steps": total_steps,
    "epochs": total_steps / steps_per_epoch,
  }


def make_losses(loss_config):
  """(training loss, evaluation loss): evaluation reports the plain negative
  log-likelihood (no label smoothing), so its loss and perplexity compare across runs."""
  kwargs = {k: v for k, v in loss_config.items() if k != "name"}
  make = registry.losses.get(loss_config.name)
  eval_kwargs = {**kwargs, "label_smoothing": 0.0} if "label_smoothing" in kwargs else kwargs
  return make(**kwargs), make(**eval_kwargs)


@dataclasses.dataclass
class Experiment:
  config: Any
  mesh: Any
  dataset: Any
  derived: dict
  model: Any
  loss_fn: Any
  eval_loss_fn: Any
  tx: Any
  schedule: Any
  init: Any  # () -> a fresh TrainState (unboxed); jit it with out_shardings=state_sharding
  state_shape: Any
  state_sharding: Any
  sharding_rows: list
  batch_sharding: Any
  replicated: Any
  activations: Any  # () -> the context that pins activations while a step is traced
  process_index: int
  process_count: int

  @property
  def total_steps(self) -> int:
    return self.derived["total_steps"]

  @property
  def variables_sharding(self):
    return self.state_sharding.variables()


def check_batch_sizes(config, mesh, process_count: int) -> None:
  from research import parallel

  dp = parallel.data_parallel_size(mesh, tuple(config.sharding_rules.batch))
  for key in ("global_batch_size", "eval_batch_size"):
    if config[key] % dp or config[key] % process_count:
      raise config_lib.ConfigError(
        f"config.{key}={config[key]}: must be divisible by the data-parallel size {dp} "
        f"and the process count {process_count}"
      )
  microbatch = config.global_batch_size // config.grad_accum_steps
  if config.global_batch_size % config.grad_accum_steps or microbatch % dp:
    raise config_lib.ConfigError(
      f"config.grad_accum_steps={config.grad_accum_steps}: global_batch_size "
      f"{config.global_batch_size} must split into that many microbatches, each divisible by "
      f"the data-parallel size {dp}"
    )


@contextlib.contextmanager
def model_refusals_as_config_errors():
  """A ValueError that names a model setting ("model.attention='flash': valid: ...",
  "sequence length 300 > model.max_len=64"), raised while a model is traced, becomes
  the config's error: one line, exit 2. Other ValueErrors pass as they are."""
  try:
    yield
  except ValueError as e:
    first_line = str(e).splitlines()[0] if str(e) else ""
    if "model." not in first_line:
      raise
    prefix = "config." if first_line.startswith("model.") else ""
    raise config_lib.ConfigError(prefix + first_line) from None


def build(config, before_data=None) -> Experiment:
  """Validates the config, builds the mesh, loads the data (process 0 prepares it,
  the others read it after), the model, the optimizer and the state's shardings.
  `before_data()` runs after the cheap checks and before the data is touched."""
  config_lib.validate(config)
  import jax
  import numpy as np

  from research import optim, parallel, sharding, transfer
  from research import step as step_lib

  process_index, process_count = jax.process_index(), jax.process_count()
  mesh = parallel.make_mesh(config.mesh)
  check_batch_sizes(config, mesh, process_count)
  if before_data:
    before_data()

  t0 = time.perf_counter()
  load_dataset = lambda: registry.datasets.get(config.data.name)(config.data)
  dataset = load_dataset() if process_index == 0 else None
  parallel.barrier("dataset_prepared")
  dataset = dataset or load_dataset()
  logging.info("[TIMING] data load: %.1fs", time.perf_counter() - t0)
  derived = derived_values(config, dataset.num_train_examples)

  model = registry.build_model(config, dataset)
  loss_fn, eval_loss_fn = make_losses(config.loss)
  tx, schedule = optim.make_optimizer(
    config.optimizer, config.schedule, derived["total_steps"],
    labels=transfer.param_labels(config.init), scale=config.init.backbone_lr_scale,
  )  # fmt: skip
  init = functools.partial(
    step_lib.init_state, model, tx, rng_for(config.seed, "params"), dataset.eval["inputs"][:1]
  )
  with model_refusals_as_config_errors():
    boxed_shape = jax.eval_shape(functools.partial(init, boxed=True))
  state_shape, state_sharding, rows = sharding.state_shardings(
    boxed_shape, mesh, config.sharding_rules
  )
  derived["num_params"] = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state_shape.params)))
  derived["mesh"] = dict(mesh.shape)
  derived["num_devices"] = jax.device_count()
  return Experiment(
    config=config,
    mesh=mesh,
    dataset=dataset,
    derived=derived,
    model=model,
    loss_fn=loss_fn,
    eval_loss_fn=eval_loss_fn,
    tx=tx,
    schedule=schedule,
    init=init,
    state_shape=state_shape,
    state_sharding=state_sharding,
    sharding_rows=rows,
    batch_sharding=parallel.batch_sharding(mesh, tuple(config.sharding_rules.batch)),
    replicated=parallel.replicated(mesh),
    activations=functools.partial(sharding.activation_context, mesh, config.sharding_rules),
    process_index=process_index,
    process_count=process_count,
  )


# XLA's GPU compiler fuses the initialisers of same-shaped parameters (every layer's
# random draws and truncated normals) into one kernel per shape, and generating code
# for such a kernel grows faster than its size: the GPT-2-shaped LM's state took 84-88 s
# to compile on an H200, 78 s of it in code generation. Kept apart (the init runs once:
# sharing kernels saves it nothing), see results/benchmarks_gpu.md.
INIT_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "multi_output_fusion"}
# On the CPU, LLVM at -O1 for the init (its kernels run once): a ResNet-8's state
# compiled in 0.83 s instead of 3.63, the MNIST CNN's in 0.35 instead of 1.09, with the
# same values bit for bit (-O0 changes them). XLA's default -O2 vectorises the train
# and eval steps, which run many times.
CPU_INIT_COMPILER_OPTIONS = {**INIT_COMPILER_OPTIONS, "xla_backend_optimization_level": 1}


def init_compiler_options(mesh) -> dict:
  """The compiler options of the state's init on the mesh's platform."""
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  return CPU_INIT_COMPILER_OPTIONS if on_cpu else INIT_COMPILER_OPTIONS


def fresh_state(exp: Experiment):
  """The initial train state on the mesh: initialised, then (with config.init.checkpoint)
  the mapped parameters loaded from another run (research.transfer)."""
  import jax

  from research import transfer

  t0 = time.perf_counter()
  lowered = jax.jit(exp.init, out_shardings=exp.state_sharding).lower()
  init = lowered.compile(compiler_options=init_compiler_options(exp.mesh))
  t1 = time.perf_counter()
  state = jax.block_until_ready(init())
  logging.info("[TIMING] state init: compile %.2fs, run %.2fs", t1 - t0, time.perf_counter() - t1)
  if exp.config.init.checkpoint:
    state, report = transfer.load_into(state, exp.config.init, exp.tx, exp.state_sharding)
    exp.derived["init"] = report
    logging.info(
      "initialised from %s step %d: %d arrays loaded, %d fresh (%s)",
      report["checkpoint"], report["step"], report["loaded"], len(report["fresh"]),
      ", ".join(report["fresh"][:8]),
    )  # fmt: skip
  return state
