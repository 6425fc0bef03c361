"""Train, evaluate and checkpoint one experiment.

    python -m research.train --config=experiments/mnist_cnn.py --workdir=runs/mnist_cnn

flags -> config (validated) -> mesh -> data -> model + optimizer -> init or
restore -> loop (step, log, eval, checkpoint) -> final evaluation -> close.
Re-running the same command on the same workdir resumes from its latest
checkpoint. Bad input exits with code 2 and one line naming what is wrong.
"""

from __future__ import annotations

import json
import logging as logging_std
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from research import cli, experiment, registry
from research import config as config_lib

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
DEPLOYMENT_KEYS = (
  "data.raw_dir", "data.data_dir", "mesh.data", "mesh.fsdp", "mesh.model", "steps_per_dispatch",
  "profile.start_step", "profile.num_steps", "keep_every_steps",
)  # fmt: skip
USAGE_ERRORS = (config_lib.ConfigError, registry.UnknownNameError)
EXIT_USAGE = 2


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
  if saved_path.exists() and not allow_config_change and has_trained(workdir):
    saved = json.loads(saved_path.read_text())["config"]
    current = json.loads(config_lib.to_json(config))["config"]
    differ = config_lib.diff(saved, current, ignore=DEPLOYMENT_KEYS)
    if differ:
      raise config_lib.ConfigError(
        f"--workdir={workdir} holds a run with another config ({'; '.join(differ)}); "
        "use a new --workdir, or --allow_config_change to resume it anyway"
      )


def has_trained(workdir: Path) -> bool:
  """Whether a run in `workdir` logged a train step or saved a checkpoint. One that
  stopped before either (bad input found at its first step) leaves only its config
  and tables, which a corrected command may replace."""
  metrics = workdir / "metrics.jsonl"
  return bool(list(workdir.glob("checkpoints*/*"))) or (
    metrics.exists() and metrics.stat().st_size > 0
  )


class TrainingHalted(RuntimeError):
  """A NaN/Inf loss or gradient under config.nan_policy="halt"."""


def summing(step_fn):
  """`step_fn(state, *feed) -> (state, metrics)` as `fn(state, sums, *feed) -> (state, sums)`.

  The sums (zero_sums's) add up each metric on the device over the steps since the
  last log line, count the steps, and keep the first NaN/Inf step's number (1-based; 0:
  none), loss and gradient norm for config.nan_policy="halt". A step thus returns no
  per-step arrays for the loop to hold, and a log line stacks nothing: it fetches a
  dozen scalars. (Stacking each pending step's metrics compiled one program per count
  of steps: 2 s for 1,000 steps on this CPU, 17 s for 4,530, and ~6 us per step.)
  """
  import jax
  import jax.numpy as jnp

  def fn(state, sums, *feed):
    number = state.step + 1
    state, metrics = step_fn(state, *feed)
    first = (metrics["nonfinite"] > 0) & (sums["first_nonfinite"]["step"] == 0)
    keep_first = lambda new, old: jnp.where(first, jnp.asarray(new, old.dtype), old)  # noqa: E731
    return state, {
      "sum": jax.tree.map(lambda s, m: s + jnp.asarray(m, s.dtype), sums["sum"], metrics),
      "steps": sums["steps"] + 1,
      "first_nonfinite": jax.tree.map(
        keep_first,
        {"step": number, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"]},
        sums["first_nonfinite"],
      ),
    }

  return fn


def repeated(fn, steps: int):
  """`fn(state, sums, *feed) -> (state, sums)` applied `steps` times in one program (a
  lax.scan). The feed is the same for every step: the arrays held on the device, from
  which each step gathers its own batch by state.step (parallel.BatchFeeder)."""
  import jax

  def fn_steps(state, sums, *feed):
    body = lambda carry, _: (fn(*carry, *feed), None)  # noqa: E731
    return jax.lax.scan(body, (state, sums), None, length=steps)[0]

  return fn_steps


def zero_sums() -> dict:
  """summing's sums before the first step of a log interval (host arrays)."""
  import numpy as np

  from research.step import TRAIN_METRICS

  zero = np.zeros((), np.float32)
  return {
    "sum": {name: zero for name in TRAIN_METRICS},
    "steps": np.zeros((), np.int32),
    "first_nonfinite": {"step": np.zeros((), np.int32), "loss": zero, "grad_norm": zero},
  }


def halt_if_nonfinite(sums: dict) -> None:
  """Raises TrainingHalted naming the first step (1-based) whose loss or gradient was
  NaN/Inf, from summing's fetched sums."""
  first = sums["first_nonfinite"]
  if int(first["step"]):
    name = "loss" if not math.isfinite(float(first["loss"])) else "grad_norm"
    raise TrainingHalted(
      f"step {int(first['step'])}: {name} is {float(first[name])} (config.nan_policy='halt')"
    )


def jit_train_step(exp, feeder=None, summed: bool = False, steps: int = 1):
  """The experiment's train step, jitted with the state's and the batch's shardings
  (the state is donated: updated in place): `step(state, batch) -> (state, metrics)`,
  or with a parallel.BatchFeeder, `step(state, *feeder(step_number))`; `summed`:
  `step(state, sums, ...) -> (state, sums)` (see summing), the sums donated too, and
  `steps` > 1 of them per call (see repeated; data held on the device only)."""
  import jax

  from research import experiment, transfer
  from research import step as step_lib

  config = exp.config
  step_fn = step_lib.make_train_step(
    exp.model,
    exp.tx,
    exp.loss_fn,
    exp.schedule,
    experiment.rng_for(config.seed, "dropout"),
    config.optimizer.l1_penalty,
    config.optimizer.l2_penalty,
    skip_nonfinite=config.nan_policy == "skip",
    sharding_context=exp.activations,
    microbatches=config.grad_accum_steps,
    train_model_state=transfer.trains_model_state(config.init),
  )
  feed_shardings = (exp.batch_sharding,)
  if feeder is not None:
    step_fn, feed_shardings = feeder.wrap(step_fn), feeder.shardings
  if summed:
    return jax.jit(
      summing(step_fn) if steps == 1 else repeated(summing(step_fn), steps),
      in_shardings=(exp.state_sharding, exp.replicated, *feed_shardings),
      out_shardings=(exp.state_sharding, exp.replicated),
      donate_argnums=(0, 1),
    )
  return jax.jit(
    step_fn,
    in_shardings=(exp.state_sharding, *feed_shardings),
    out_shardings=(exp.state_sharding, exp.replicated),
    donate_argnums=(0,),
  )


def speed_meter(exp, compiled, first_step: int):
  """metrics.Progress with tokens per step and model FLOPs per device (research.flops:
  the formula where one is known, else XLA's count of the compiled first step; with
  length-bucketed batches, that of the first step's bucket)."""
  import jax

  from research import flops
  from research import metrics as metrics_lib

  config = exp.config
  formula = flops.config_flops(config, exp.dataset.model_kwargs)
  per_device = formula / jax.device_count() if formula else flops.compiled_flops(compiled)
  peak = None
  if per_device:
    peak, source = flops.peak_per_device(config.dtype)
    logging.info("MFU's peak: %.4g TFLOP/s per device (%s)", peak / 1e12, source)
  tokens = config.global_batch_size * config.data.seq_len if config.data.seq_len else 0
  return metrics_lib.Progress(
    first_step, exp.total_steps, config.global_batch_size, tokens, per_device, peak
  )


def train_and_evaluate(
  config, workdir: str, allow_config_change: bool = False, on_log: Callable | None = None
) -> dict:
  """Runs (or resumes) the experiment; returns the final eval metrics.

  on_log(step, metrics), if given, is called on every process after each train log
  line, with the averaged train metrics and speed (research.bench runs its hand-written
  loop's windows there, between the framework's).
  """
  config_lib.validate(config)
  workdir = Path(workdir)
  from research import runtime

  runtime.enable_compilation_cache()  # before the first compile: a second start skips it
  check = lambda: check_workdir(workdir, config, allow_config_change)  # noqa: E731
  exp = experiment.build(config, before_data=check)

  import jax

  from research import checkpoint, evaluators, parallel, profiling, sharding, transfer
  from research import metrics as metrics_lib
  from research.preemption import PreemptionWatcher
  from research.versions import versions

  process_index, total_steps = exp.process_index, exp.total_steps
  device = jax.local_devices()[0]  # its memory_stats(): GPUs and TPUs report, the CPU not
  # Data and the steps per call before the workdir is touched: a bad setting leaves no trace.
  train_loader = exp.dataset.train_loader(
    config.global_batch_size, config.seed, process_index, exp.process_count
  )
  feeder = parallel.BatchFeeder(train_loader, exp.batch_sharding, config.data.device_resident_mb)
  per_call = config.steps_per_dispatch
  if per_call > 1 and not (
    feeder.device_resident and per_call * config.global_batch_size <= train_loader.num_examples
  ):
    raise config_lib.ConfigError(
      f"config.steps_per_dispatch={per_call} needs the training data held on the device "
      "(in memory, within data.device_resident_mb, data.pp_train of ops with a device form) and at "
      f"most one epoch per call ({per_call} x global_batch_size={config.global_batch_size}); "
      "set config.steps_per_dispatch=1"
    )
  sharding_table = sharding.table(exp.sharding_rows)
  ckpt = checkpoint.Checkpointer(
    workdir / "checkpoints", config.max_to_keep, config.keep_every_steps
  )
  abstract = checkpoint.abstract_with_shardings(exp.state_shape, exp.state_sharding)
  start_step, state = ckpt.restore_latest_good(abstract)
  if start_step is None and config.init.checkpoint and config.init.mode == "continue":
    start_step, state, exp.derived["init"] = transfer.continue_from(
      config.init.checkpoint, abstract
    )
    logging.info("continuing %s from its step %d", config.init.checkpoint, start_step)
  elif start_step is None:
    state = experiment.fresh_state(exp)  # with config.init.checkpoint: loads another run's
    start_step = 0
  else:
    logging.info("resumed from checkpoint at step %d", start_step)
  logging.info("config:\n%s", config)
  logging.info("derived: %s", json.dumps(exp.derived))
  logging.info("sharding over mesh %s:\n%s", dict(exp.mesh.shape), sharding_table)
  if process_index == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    saved = workdir / "config.json"
    if start_step and saved.exists():  # a resumed transfer run keeps the record of its source
      init = json.loads(saved.read_text()).get("derived", {}).get("init")
      exp.derived.update({"init": init} if init else {})
    saved.write_text(config_lib.to_json(config, derived=exp.derived, versions=versions()))
    (workdir / "sharding.md").write_text(
      f"# Sharding over mesh {dict(exp.mesh.shape)}\n\n{sharding_table}\n"
    )

  evaluation = evaluators.Evaluation(exp, output_dir=workdir)
  train_steps = {}  # steps per call -> the jitted step (a call stops at each log, eval, save)

  def jitted(count: int):
    if count not in train_steps:
      train_steps[count] = jit_train_step(exp, feeder, summed=True, steps=count)
    return train_steps[count]

  boundaries = [config.log_every_steps, config.checkpoint_every_steps]
  boundaries += [config.eval_every_steps] if config.eval_every_steps > 0 else []
  trace = profiling.StepTrace(
    config.profile, workdir / "tensorboard", start_step, enabled=process_index == 0
  )

  def steps_from(step: int) -> int:
    """Steps in the call starting after `step`: up to the next log, eval, save, profile
    edge or end."""
    periodic = (every - step % every for every in boundaries)
    edges = (edge - step for edge in trace.edges(step))
    return min(per_call, total_steps - step, *periodic, *edges)

  if feeder.device_resident:
    held_step = int(jax.device_get(state.step))
    if held_step != start_step:  # the step gathers its batch by state.step
      raise RuntimeError(f"the train state is at step {held_step}, the loop at {start_step}")
    logging.info(
      "training data: %.1f MB held on every device, batches gathered there%s",
      feeder.nbytes / 1e6,
      f" and data.pp_train={config.data.pp_train!r} applied"
      if feeder.on_device is not None
      else "",
    )
  writer = metrics_lib.MetricWriter(workdir, enabled=process_index == 0)
  metadata = {"config": config.to_dict(), "versions": versions()}
  metadata = json.loads(json.dumps(metadata, default=str))
  new_sums = lambda: jax.device_put(zero_sums(), exp.replicated)  # noqa: E731
  sums = new_sums()  # the metrics summed on the device since the last log line
  preemption = PreemptionWatcher()
  t_loop = time.perf_counter()
  try:
    step, calls, progress = start_step, 0, None  # the speed meter starts after the first call
    while step < total_steps:
      count = steps_from(step)
      feed = feeder(step, count)  # the batch, or the arrays on the device the step gathers from
      train_step = jitted(count)
      trace.before(step, sums)
      if step == start_step:  # XLA's FLOP count for MFU; the call below reuses this compile
        t_lower = time.perf_counter()
        with experiment.model_refusals_as_config_errors():  # settings refused in training
          lowered = train_step.lower(state, sums, *feed)
        t_compile = time.perf_counter()
        first_compiled = lowered.compile()  # from the persistent cache on a second start
        logging.info(
          "[TIMING] first step: trace + lower %.2fs, compile %.2fs",
          t_compile - t_lower, time.perf_counter() - t_compile,
        )  # fmt: skip
        plan = metrics_lib.step_memory(first_compiled)
        if plan:
          logging.info("[MEMORY] %s", metrics_lib.memory_line(plan, device.memory_stats()))
        if count > 1:  # XLA counts a loop's body once: one step's count, not compiled
          first_compiled = jitted(1).lower(state, sums, *feed)
      state, sums = train_step(state, sums, *feed)  # a new shape (length buckets) retraces
      ckpt.check()  # a failed background save stops the run here, not at the next save
      done = step + count
      writing = trace.after(done, sums)
      if writing and progress is not None:  # the speed meter leaves the trace's writing out
        progress.exclude(writing)
      if step == start_step:
        jax.block_until_ready(sums)
        logging.info(
          "[TIMING] first step (compile + run%s): %.2fs",
          f", {count} steps" if count > 1 else "", time.perf_counter() - t_loop,
        )  # fmt: skip
        progress = speed_meter(exp, first_compiled, done)
      step = done
      log_now = done % config.log_every_steps == 0 or done == total_steps
      save_now = done % config.checkpoint_every_steps == 0 or done == total_steps
      if log_now or save_now:
        fetched = jax.device_get(sums)  # a dozen scalars
        if config.nan_policy == "halt":
          try:
            halt_if_nonfinite(fetched)
          except TrainingHalted as halted:
            ckpt.manager.wait_until_finished()  # in-flight saves of good states finish
            last_good = ckpt.latest_step()
            kept = f"last good checkpoint: step {last_good}" if last_good else "no checkpoint yet"
            raise TrainingHalted(f"{halted}; {kept}") from None
      if log_now:
        steps = int(fetched["steps"])
        averaged = {k: float(v) / steps for k, v in fetched["sum"].items() if k != "nonfinite"}
        averaged["nonfinite_steps"] = int(fetched["sum"]["nonfinite"])
        sums = new_sums()
        speed = {**progress.report(done), **metrics_lib.peak_memory(device.memory_stats())}
        writer.write(done, "train", {**averaged, **speed})
        if process_index == 0:
          metrics_lib.log_line(done, total_steps, averaged, speed)
        if on_log is not None:
          on_log(done, {**averaged, **speed})
      if config.eval_every_steps > 0 and done % config.eval_every_steps == 0 and done < total_steps:
        eval_metrics = evaluation(state.eval_variables(), done, final=False)
        writer.write(done, config.data.eval_split, eval_metrics)
        logging.info("step %d %s: %s", done, config.data.eval_split, eval_metrics)
      # Asked after every call on every process: several processes' sync point is the
      # call after the latest any of them reported, so none may be skipped (a save step's
      # included; counting calls, not steps, as a call may take several).
      calls += 1
      stop = preemption.should_stop(calls)
      if save_now or stop:
        t_save = time.perf_counter()
        ckpt.save(done, state, metadata)
        if process_index == 0 and save_now:
          logging.info(
            "[TIMING] checkpoint %d: the loop waited %.3fs (the write goes on in the background)",
            done, time.perf_counter() - t_save,
          )  # fmt: skip
      if stop:
        logging.warning(
          "preempted (SIGTERM) at step %d: checkpoint saved; the same command resumes here", done
        )
        return {"preempted_at_step": done}

    preemption.close()  # a SIGTERM during the final evaluation stops the process as usual
    final = evaluation(state.eval_variables(), total_steps, final=True)
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
    trace.stop()
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
    from research import parallel, runtime

    runtime.tune_malloc()  # before JAX starts its threads
    runtime.apply_xla_defaults(_CONFIG.value.model.get("name", ""))  # before JAX starts
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    train_and_evaluate(_CONFIG.value, _WORKDIR.value, _ALLOW_CONFIG_CHANGE.value)
  except USAGE_ERRORS + (_data_error(),) as e:
    if _VERBOSE.value:
      raise
    return _usage_error(str(e))
  except (TrainingHalted, _save_failed()) as e:
    if isinstance(e, _save_failed()) and not _VERBOSE.value:
      # A failed save can leave Orbax coroutines that were never awaited; at exit Python
      # would print a RuntimeWarning for each after our one line (seen once in CI).
      warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def _save_failed():
  from research.checkpoint import SaveFailed  # imports Orbax, which the run has loaded

  return SaveFailed


def _data_error():
  from research.data.sources import DataError  # light: numpy only

  return DataError


_usage_error = cli.usage_error
parse_flags = cli.parse_flags


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
