"""Train, evaluate and checkpoint one experiment.

    python -m research.train --config=experiments/mnist_cnn.py --workdir=runs/mnist_cnn

flags -> config (validated) -> mesh -> data -> model + optimizer -> init or
restore -> loop (step, log, eval, checkpoint) -> final evaluation -> close.
Re-running the same command on the same workdir resumes from its latest
checkpoint. Bad input exits with code 2 and one line naming what is wrong.
"""

from __future__ import annotations

import functools
import json
import logging as logging_std
import math
import os
import re
import sys
import time
import zlib
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from research import config as config_lib
from research import registry

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, path.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
  "allow_config_change", False, "Resume a workdir whose saved config differs from this one."
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for bad input.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  "",
  "host:port of process 0 for a manual multi-process launch "
  "(or $RESEARCH_COORDINATOR); SLURM and Cloud TPU are detected without it.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in a manual launch.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index in a manual launch.")

# Where a run executes, not what it computes: a workdir may resume with other values.
DEPLOYMENT_KEYS = ("data.raw_dir", "data.data_dir", "mesh.data", "mesh.fsdp", "mesh.model")
USAGE_ERRORS = (config_lib.ConfigError, registry.UnknownNameError)
EXIT_USAGE = 2


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


def check_workdir(workdir: Path, config, allow_config_change: bool) -> None:
  """Fails before any work if the workdir is unwritable or holds a run with another config.

  Creates nothing: a run that stops on bad input leaves no trace.
  """
  existing = workdir
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
    raise config_lib.ConfigError(
      f"--workdir={workdir}: not writable ({existing} is not a writable directory)"
    )
  saved_path = workdir / "config.json"
  if saved_path.exists() and not allow_config_change:
    saved = json.loads(saved_path.read_text())["config"]
    current = json.loads(config_lib.to_json(config))["config"]
    differ = config_lib.diff(saved, current, ignore=DEPLOYMENT_KEYS)
    if differ:
      raise config_lib.ConfigError(
        f"--workdir={workdir} holds a run with another config ({'; '.join(differ)}); "
        "use a new --workdir, or --allow_config_change to resume it anyway"
      )


class TrainingHalted(RuntimeError):
  """A NaN/Inf loss or gradient under config.nan_policy="halt"."""


def halt_if_nonfinite(pending_metrics: list[dict], flags, first_step: int) -> None:
  """Raises TrainingHalted naming the first step (1-based) whose loss or gradient was NaN/Inf.

  `flags` are the host values of each pending step's "nonfinite" metric.
  """
  import jax

  for offset, flag in enumerate(flags):
    if flag:
      metrics = jax.device_get(pending_metrics[offset])
      name = "loss" if not math.isfinite(metrics["loss"]) else "grad_norm"
      raise TrainingHalted(
        f"step {first_step + offset}: {name} is {metrics[name]} (config.nan_policy='halt')"
      )


def make_losses(loss_config):
  """(training loss, evaluation loss): evaluation reports the plain negative
  log-likelihood (no label smoothing), so its loss and perplexity compare across runs."""
  from research import registry

  kwargs = {k: v for k, v in loss_config.items() if k != "name"}
  make = registry.losses.get(loss_config.name)
  eval_kwargs = {**kwargs, "label_smoothing": 0.0} if "label_smoothing" in kwargs else kwargs
  return make(**kwargs), make(**eval_kwargs)


def evaluate(eval_step, variables, arrays, eval_batch_size, sharding, process_index, process_count):
  """Mean loss and accuracy over every example of `arrays`, each visited exactly once;
  with next-token targets also perplexity and bits per token (character, for char LMs)."""
  import jax

  from research import parallel
  from research.data import loader

  totals = None
  for local in loader.eval_batches(arrays, eval_batch_size, process_index, process_count):
    sums = eval_step(variables, parallel.global_batch(local, sharding))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  assert totals["count"] == len(arrays["targets"]), (totals["count"], len(arrays["targets"]))
  metrics = {
    "loss": totals["loss_sum"] / totals["count"],
    "accuracy": totals["correct"] / totals["count"],
  }
  if arrays["targets"].ndim > 1:  # sequences: per-token figures over every real target
    token_loss = totals["target_loss_sum"] / totals["target_count"]
    metrics["token_accuracy"] = totals["target_correct"] / totals["target_count"]
    metrics["perplexity"] = math.exp(token_loss)
    metrics["bits_per_token"] = token_loss / math.log(2)
  return metrics


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False) -> dict:
  """Runs (or resumes) the experiment; returns the final eval metrics."""
  config_lib.validate(config)
  workdir = Path(workdir)

  import jax
  import jax.numpy as jnp
  import numpy as np

  from research import checkpoint, optim, parallel, sharding
  from research import metrics as metrics_lib
  from research import step as step_lib
  from research.preemption import PreemptionWatcher
  from research.versions import versions

  process_index, process_count = jax.process_index(), jax.process_count()
  mesh = parallel.make_mesh(config.mesh)
  batch_axes = tuple(config.sharding_rules.batch)
  dp = parallel.data_parallel_size(mesh, batch_axes)
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
  check_workdir(workdir, config, allow_config_change)

  # Process 0 prepares the data (TFDS writes it once); the others read it after.
  t0 = time.perf_counter()
  load_dataset = lambda: registry.datasets.get(config.data.name)(config.data)
  dataset = load_dataset() if process_index == 0 else None
  parallel.barrier("dataset_prepared")
  dataset = dataset or load_dataset()
  logging.info("[TIMING] data load: %.1fs", time.perf_counter() - t0)
  derived = derived_values(config, dataset.num_train_examples)
  total_steps = derived["total_steps"]

  model = registry.build_model(config, dataset)
  loss_fn, eval_loss_fn = make_losses(config.loss)
  tx, schedule = optim.make_optimizer(config.optimizer, config.schedule, total_steps)

  init = functools.partial(
    step_lib.init_state, model, tx, rng_for(config.seed, "params"), dataset.eval["inputs"][:1]
  )
  state_shape, state_sharding, sharding_rows = sharding.state_shardings(
    jax.eval_shape(functools.partial(init, boxed=True)), mesh, config.sharding_rules
  )
  sharding_table = sharding.table(sharding_rows)
  derived["num_params"] = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state_shape.params)))
  derived["mesh"] = dict(mesh.shape)
  derived["num_devices"] = jax.device_count()
  logging.info("config:\n%s", config)
  logging.info("derived: %s", json.dumps(derived))
  logging.info("sharding over mesh %s:\n%s", dict(mesh.shape), sharding_table)
  if process_index == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(
      config_lib.to_json(config, derived=derived, versions=versions())
    )
    (workdir / "sharding.md").write_text(
      f"# Sharding over mesh {dict(mesh.shape)}\n\n{sharding_table}\n"
    )

  batch_sharding = parallel.batch_sharding(mesh, batch_axes)
  activations = functools.partial(sharding.activation_context, mesh, config.sharding_rules)
  replicated = parallel.replicated(mesh)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", config.max_to_keep)
  abstract = checkpoint.abstract_with_shardings(state_shape, state_sharding)
  start_step, state = ckpt.restore_latest_good(abstract)
  if start_step is None:
    state = jax.jit(init, out_shardings=state_sharding)()
    start_step = 0
  else:
    logging.info("resumed from checkpoint at step %d", start_step)

  train_step = jax.jit(
    step_lib.make_train_step(
      model,
      tx,
      loss_fn,
      schedule,
      rng_for(config.seed, "dropout"),
      config.optimizer.l1_penalty,
      config.optimizer.l2_penalty,
      skip_nonfinite=config.nan_policy == "skip",
      sharding_context=activations,
      microbatches=config.grad_accum_steps,
    ),
    in_shardings=(state_sharding, batch_sharding),
    out_shardings=(state_sharding, replicated),
    donate_argnums=(0,),
  )
  eval_step = jax.jit(
    step_lib.make_eval_step(model, eval_loss_fn, activations),
    in_shardings=(state_sharding.variables(), batch_sharding),
    out_shardings=replicated,
  )
  run_eval = lambda variables: evaluate(  # noqa: E731
    eval_step,
    variables,
    dataset.eval,
    config.eval_batch_size,
    batch_sharding,
    process_index,
    process_count,
  )
  train_loader = dataset.train_loader(
    config.global_batch_size, config.seed, process_index, process_count
  )
  writer = metrics_lib.MetricWriter(workdir, enabled=process_index == 0)
  metadata = {"config": config.to_dict(), "versions": versions()}
  metadata = json.loads(json.dumps(metadata, default=str))
  pending = []  # device metrics since the last log line
  preemption = PreemptionWatcher()
  t_loop = time.perf_counter()
  try:
    for step in range(start_step, total_steps):
      batch = parallel.global_batch(train_loader(step), batch_sharding)
      state, step_metrics = train_step(state, batch)
      ckpt.check()  # a failed background save stops the run here, not at the next save
      pending.append(step_metrics)
      done = step + 1
      if step == start_step:
        jax.block_until_ready(step_metrics)
        logging.info("[TIMING] first step (compile + run): %.1fs", time.perf_counter() - t_loop)
        progress = metrics_lib.Progress(done, total_steps, config.global_batch_size)
      log_now = done % config.log_every_steps == 0 or done == total_steps
      save_now = done % config.checkpoint_every_steps == 0 or done == total_steps
      if log_now or save_now:
        nonfinite = jax.device_get([m["nonfinite"] for m in pending])
        if config.nan_policy == "halt":
          try:
            halt_if_nonfinite(pending, nonfinite, first_step=done - len(pending) + 1)
          except TrainingHalted as halted:
            ckpt.manager.wait_until_finished()  # in-flight saves of good states finish
            last_good = ckpt.latest_step()
            kept = f"last good checkpoint: step {last_good}" if last_good else "no checkpoint yet"
            raise TrainingHalted(f"{halted}; {kept}") from None
      if log_now:
        averaged = jax.device_get(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *pending))
        averaged.pop("nonfinite")
        averaged["nonfinite_steps"] = sum(nonfinite)
        pending = []
        speed = progress.report(done)
        writer.write(done, "train", {**averaged, **speed})
        if process_index == 0:
          metrics_lib.log_line(done, total_steps, averaged, speed)
      if config.eval_every_steps > 0 and done % config.eval_every_steps == 0 and done < total_steps:
        eval_metrics = run_eval(state.eval_variables())
        writer.write(done, config.data.eval_split, eval_metrics)
        logging.info("step %d %s: %s", done, config.data.eval_split, eval_metrics)
      if save_now:
        ckpt.save(done, state, metadata)
      elif preemption.should_stop(done):
        ckpt.save(done, state, metadata)
        logging.warning(
          "preempted (SIGTERM) at step %d: checkpoint saved; the same command resumes here", done
        )
        return {"preempted_at_step": done}

    preemption.close()  # a SIGTERM during the final evaluation stops the process as usual
    final = run_eval(state.eval_variables())
    if hasattr(dataset, "generation_metrics"):  # e.g. BLEU of translations
      t_generate = time.perf_counter()
      params = jax.device_get(state.eval_variables()["params"])
      generated, lines = dataset.generation_metrics(model, params, config.decode)
      final.update(generated)
      logging.info("[TIMING] generation on %s: %.1fs", config.data.eval_split,
                   time.perf_counter() - t_generate)  # fmt: skip
      if process_index == 0:
        split = re.sub(r"[^\w.-]+", "_", config.data.eval_split).strip("_")
        outputs = workdir / f"generated_{split}_{total_steps}.txt"
        outputs.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    writer.write(total_steps, config.data.eval_split, final)
    if process_index == 0:
      logging.info(
        "final %s metrics at step %d: %s",
        config.data.eval_split,
        total_steps,
        ", ".join(f"{k}={v:.4f}" for k, v in final.items()),
      )
    return final
  finally:  # every way out waits for in-flight saves (an exit during one hangs Orbax)
    preemption.close()
    ckpt.close()
    writer.close()


class _QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of Orbax, TFDS and JAX internals; their warnings still show.

  Orbax's errors keep their message but lose the traceback (one per background
  thread, ~100 lines each) unless --verbose: the run reports the failure itself.
  The failed save's leftover asyncio futures ("exception was never retrieved")
  are dropped for the same reason.
  """

  NOISY = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/", "/etils/")

  def filter(self, record):
    if _VERBOSE.value:
      return True
    if record.name == "asyncio" and "orbax-checkpoint-tmp" in record.getMessage():
      return False
    noisy = any(n in record.pathname for n in self.NOISY)
    if noisy and record.exc_info and "/orbax/" in record.pathname:
      record.exc_info, record.exc_text = None, None
    return record.levelno >= logging_std.WARNING or not noisy


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    return _usage_error("--config and --workdir are required")
  try:
    from research import parallel

    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    train_and_evaluate(_CONFIG.value, _WORKDIR.value, _ALLOW_CONFIG_CHANGE.value)
  except USAGE_ERRORS + (_data_error(),) as e:
    if _VERBOSE.value:
      raise
    return _usage_error(str(e))
  except (TrainingHalted, _save_failed()) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def _save_failed():
  from research.checkpoint import SaveFailed  # imports Orbax, which the run has loaded

  return SaveFailed


def _data_error():
  from research.data.sources import DataError  # light: numpy only

  return DataError


def _usage_error(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USAGE)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a bad flag or override reported as one line and exit 2."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec and not Path(spec.partition(":")[0]).is_file():
    try:
      config_lib.load_file(spec)
    except config_lib.ConfigError as e:
      _usage_error(str(e))
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001  config_flags raises many types
    if "--verbose" in argv:
      raise
    try:
      message = config_lib.describe_flags_error(e, argv)
    except config_lib.ConfigError as described:
      message = str(described)
    _usage_error(message)


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
