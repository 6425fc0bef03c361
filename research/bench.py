"""Benchmarks, measured side by side in one run: `results/benchmarks.md` and `.json`.

    python -m research.bench                  # every section, the sizes in results/
    python -m research.bench --smoke          # tiny sizes, seconds (CI runs this)
    python -m research.bench --sections=speed,checkpoint

Sections (each row is a ratio of two things timed in the same process, minutes apart
at most, on the same data: this machine is shared and noisy):
- speed: steps/s of `research.train` (its whole loop: loader, step, logging,
  metrics) against a minimal hand-written JAX + Flax + Optax loop of the same
  model, batch and optimizer on in-memory batches; and against PyTorch (eager
  and torch.compile) on the same shapes, when torch is installed (`.[bench]`).
- mfu: the Transformer LM's model FLOPs utilisation under research.train
  (research.flops: 6N and the attention-inclusive count) over the peak of a
  matmul measured in the same run.
- input: the loader's examples/s against the train step's, and the share of
  training time spent waiting for data (steps/s with the loader against the
  same step fed one batch already on the device, taking turns in 0.1 s windows).
- checkpoint: how long an asynchronous save blocks the train loop, and restore
  time, by state size.
- startup: compile time and the second start of the same run with the
  persistent compilation cache (research.runtime), in fresh processes.
- xla_flags: the train step under jaxlib's default CPU kernels, with XLA's own
  convolutions instead of YNNPACK's, and with YNNPACK's dot fusions (what
  research.runtime.CPU_FLAGS and MODEL_CPU_FLAGS choose from), each in a fresh
  process.
- profile: where a train step's time goes (JAX's profiler, per XLA operation,
  grouped by the model code it came from).

Timing windows alternate between the things compared; the median window is reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from absl import app, flags, logging

from research import cli, runtime
from research import config as config_lib

SECTIONS = ("xla_flags", "speed", "mfu", "input", "checkpoint", "startup", "profile")
GOALS = {
  "overhead": "research.train / hand-written JAX >= 0.98",
  "pytorch": "research.train / PyTorch eager >= 1.0 on each family",
  "mfu": "Transformer LM MFU >= 50% on this CPU",
  "input": "time waiting for data < 1% of training time",
  "checkpoint": "loop blocked per save < 2% of a one-minute save interval",
  "startup": "second start >= 5x faster to compile (persistent compilation cache)",
}


# --- What is measured: three model families on real data.


def family_config(family: str, smoke: bool):
  """(config, steps per timing window) of a benchmark family."""
  config = config_lib.base()
  config.optimizer = config_lib.entry("optimizer", "adam", learning_rate=1e-3)
  config.schedule = config_lib.entry("schedule", "constant")
  config.global_batch_size = 128
  config.eval_every_steps = -1
  if family in ("mlp", "mlp_host", "mlp_host_10", "cnn", "cnn_augment"):
    dataset = "fashion_mnist" if family == "cnn_augment" else "mnist"
    config.data.name = dataset
    config.data.raw_dir = config_lib.raw_data_dir(dataset)
    if family.startswith("mlp"):
      # mlp_host: ~0.15 ms steps, so the loop's own host time shows, as a GPU shows it
      # for small models (an H200 ran the 1024-wide MLP's step in 0.15 ms); _10: ten
      # steps per jitted call (config.steps_per_dispatch), the hand loop still one.
      widths = (32,) if smoke else (8,) if family.startswith("mlp_host") else (1024, 1024)
      config.model = config_lib.entry("model", "mlp", widths=widths, dropout=0.0)
      config.steps_per_dispatch = 10 if family == "mlp_host_10" else 1
      window = 5 if smoke else 40
    else:
      conv, dense = ((4, 8), 16) if smoke else ((32, 64), 128)
      config.model = config_lib.entry("model", "cnn", conv_features=conv, dense_features=dense)
      window = 3 if smoke else 10
    if family == "cnn_augment":
      config.data.pp_train = "pad(2)|random_crop(28)|flip_lr"
  elif family == "lm":
    # GPT-2 small's width and heads, 4 layers: what fits a 2-core CPU step in ~1 s.
    layers, heads, width, seq, batch = (1, 2, 32, 16, 4) if smoke else (4, 12, 768, 256, 8)
    config.data.name = "tiny_shakespeare"
    config.data.raw_dir = config_lib.raw_data_dir("tiny_shakespeare")
    config.data.eval_split = "validation"
    config.data.seq_len = seq
    config.model = config_lib.entry(
      "model", "transformer_lm", num_layers=layers, num_heads=heads, embed_dim=width, max_len=seq
    )
    config.optimizer = config_lib.entry("optimizer", "adamw", learning_rate=1e-3)
    config.sharding_rules.vocab = ()
    config.global_batch_size = batch
    config.eval_batch_size = 64
    window = 2 if smoke else 4
  else:
    raise ValueError(f"unknown family {family!r}")
  data_dir = os.environ.get("TFDS_DATA_DIR", "")
  config.data.data_dir = data_dir
  return config, window


def describe(config) -> str:
  model = {k: v for k, v in config.model.items() if k != "name"}
  shape = ", ".join(f"{k}={v}" for k, v in model.items())
  seq = f", seq {config.data.seq_len}" if config.data.seq_len else ""
  return f"{config.model.name}({shape}), batch {config.global_batch_size}{seq}"


# --- Timing helpers.


def median_rate(windows: list[tuple[int, float]]) -> float:
  """Median steps/s over (steps, seconds) windows."""
  return statistics.median(steps / seconds for steps, seconds in windows)


def host_batches(config, dataset, num_batches: int = 16) -> list[dict]:
  """The first training batches (numpy) that the hand loop and PyTorch cycle through."""
  loader = dataset.train_loader(config.global_batch_size, seed=1)
  return [loader(s) for s in range(num_batches)]


class HandLoop:
  """A minimal JAX + Flax + Optax training loop: what a researcher writes by hand.

  Same model module, optimizer and batch as the framework's run; batches are
  real examples already on the device (cycled), passed to a jitted step that
  donates the parameters and optimizer state.
  """

  def __init__(self, config, dataset, num_batches: int = 16):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import linen as nn

    from research import optim, registry

    self.model = model = registry.build_model(config, dataset)
    self.tx, _ = optim.make_optimizer(config.optimizer, config.schedule, 10**6)
    self.batches = host_batches(config, dataset, num_batches)  # host copies, for PyTorch
    self.device_batches = [jax.device_put(b) for b in self.batches]
    first = self.batches[0]["inputs"][:1]
    dummy = first.astype(jnp.float32) / 255.0 if first.dtype == "uint8" else first
    init = jax.jit(functools.partial(model.init, train=False))  # one compile, not one per op
    params = nn.meta.unbox(init(jax.random.key(0), dummy))["params"]
    self.params, self.opt_state = params, self.tx.init(params)
    tx = self.tx

    def step(params, opt_state, inputs, targets, key):
      if inputs.dtype == jnp.uint8:
        inputs = inputs.astype(jnp.float32) / 255.0

      def loss_fn(params):
        logits = model.apply({"params": params}, inputs, train=True, rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    self.step = jax.jit(step, donate_argnums=(0, 1))
    self.key = jax.random.key(1)
    self.count = 0

  def run(self, steps: int) -> float:
    """Seconds for `steps` steps, waiting for the last."""
    import jax

    t0 = time.perf_counter()
    for _ in range(steps):
      batch = self.device_batches[self.count % len(self.batches)]
      key = jax.random.fold_in(self.key, self.count)
      self.params, self.opt_state, loss = self.step(
        self.params, self.opt_state, batch["inputs"], batch["targets"], key
      )
      self.count += 1
    loss.block_until_ready()
    return time.perf_counter() - t0


def bracketed_windows(config, window: int, windows: int, workdir: Path, hand: HandLoop):
  """research.train on `config` for windows + 1 log intervals of `window` steps, with a
  window of the hand loop's after every log line (the framework's on_log hook) but the
  last, and one after the run. Returns (framework, hand) lists of (steps, seconds):
  framework interval k (the loop's steps, its metrics fetch and log line) sits between
  hand windows k and k + 1; the first interval (compilation) is not timed."""
  from research import train

  config = config.copy_and_resolve_references()
  config.num_train_steps = window * (windows + 1)
  config.log_every_steps = window
  config.checkpoint_every_steps = config.num_train_steps
  framework, hand_windows = [], []
  resumed = None  # when the framework's loop went on after the last hand window

  def between(step, metrics):
    nonlocal resumed
    del metrics
    if resumed is not None:
      framework.append((window, time.perf_counter() - resumed))
    if step < config.num_train_steps:
      hand_windows.append((window, hand.run(window)))
    resumed = time.perf_counter()

  train.train_and_evaluate(config, str(workdir), on_log=between)
  hand_windows.append((window, hand.run(window)))
  return framework, hand_windows


def bracketed_ratio(rates: list[float], neighbours: list[float]) -> tuple[float, list[float]]:
  """Steps/s of one kind of window over the other's, windows of equal steps alternating
  (neighbours has one more: n r n r ... n): each window's time against the mean time of
  the two windows either side of it, summed over the windows (a steady drift of the
  shared machine's speed cancels; the sums weigh every step alike, where a median of
  five windows moved with one of them); and each window's own ratio, whose spread is the
  measure's noise."""
  pairs = list(zip(rates, neighbours[:-1], neighbours[1:], strict=True))
  own = [1 / r for r, _, _ in pairs]  # seconds per step
  bracketing = [(1 / a + 1 / b) / 2 for _, a, b in pairs]
  ratios = [m / t for m, t in zip(bracketing, own, strict=True)]  # their time-weighted mean:
  return sum(bracketing) / sum(own), ratios


@dataclasses.dataclass
class FrameworkStep:
  """research.train's jitted step for a family, its fresh state, loader and first batch
  (already on the device)."""

  config: Any
  window: int
  exp: Any
  step: Any
  state: Any
  loader: Any
  batch: Any

  @classmethod
  def build(cls, family: str, smoke: bool) -> FrameworkStep:
    from research import experiment, parallel, train

    config, window = family_config(family, smoke)
    exp = experiment.build(config)
    loader = exp.dataset.train_loader(config.global_batch_size, config.seed)
    batch = parallel.global_batch(loader(0), exp.batch_sharding)
    state = experiment.fresh_state(exp)
    return cls(config, window, exp, train.jit_train_step(exp), state, loader, batch)


def train_env(family: str, smoke: bool) -> dict:
  """This process's environment with the XLA flags research.train gives the family's model."""
  model = family_config(family, smoke)[0].model.name
  return dict(os.environ, XLA_FLAGS=runtime.xla_flags_for(model, os.environ.get("XLA_FLAGS", "")))


# --- Sections.


def speed_row(family: str, smoke: bool, windows: int) -> dict:
  """(a) and (b) for one family, in this process (research.bench runs it in a fresh one
  with the XLA flags research.train would give the model)."""
  from research import flops, registry, torch_models

  config, window = family_config(family, smoke)
  dataset = registry.datasets.get(config.data.name)(config.data)
  peak = flops.measured_peak() if family == "lm" else None
  hand = HandLoop(config, dataset)
  hand.run(3)  # compile
  if not smoke:  # windows of >= 1 s (and log lines as far apart): 5 ms steps are noisy
    window = max(window, math.ceil(window / hand.run(window)))
  with tempfile.TemporaryDirectory(prefix="research_bench_") as workdir:
    framework, hand_windows = bracketed_windows(config, window, windows, Path(workdir), hand)
  overhead, ratios = bracketed_ratio(
    [n / t for n, t in framework], [n / t for n, t in hand_windows]
  )
  row = {
    "shape": describe(config),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "window_steps": window,
    "research_steps_per_sec": median_rate(framework),
    "hand_jax_steps_per_sec": median_rate(hand_windows),
  }
  row["overhead_ratio"] = overhead  # window by window: see bracketed_ratio
  row["overhead_window_ratios"] = ratios
  if peak:
    row["peak_flops"] = max(peak, flops.measured_peak())
  if torch_models.available():
    import jax

    step_sec = 1 / row["hand_jax_steps_per_sec"]
    compared = window if smoke else max(1, math.ceil(1.0 / step_sec))  # hand vs PyTorch
    row["torch_window_steps"] = compared

    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    row["torch_device"] = device
    for mode in ("eager", "compile"):
      if mode == "compile" and smoke:
        continue
      trainer = torch_models.Trainer(
        family, config, hand.batches, compiled=mode == "compile", device=device
      )
      trainer.run(3)
      # PyTorch's windows alternate with the hand loop's (t h t ... h t), as the
      # framework's did: hand / PyTorch bracketed, times research.train / hand, is
      # research.train / PyTorch with the machine's drift cancelled in both factors.
      # Windows of ~1 s (one LM step), three times as many for eager, the goal's: one
      # window's ratio spreads +-5% on this shared machine.
      rounds = windows * (3 if mode == "eager" and not smoke else 1)
      torch_windows, between = [(compared, trainer.run(compared))], []
      for _ in range(rounds):
        between.append((compared, hand.run(compared)))
        torch_windows.append((compared, trainer.run(compared)))
      hand_over_torch, ratios = bracketed_ratio(
        [n / t for n, t in between], [n / t for n, t in torch_windows]
      )
      row[f"torch_{mode}_steps_per_sec"] = median_rate(torch_windows)
      row[f"torch_{mode}_setup_sec"] = trainer.setup_sec
      row[f"hand_over_torch_{mode}"] = hand_over_torch
      row[f"hand_over_torch_{mode}_window_ratios"] = ratios
      row[f"vs_torch_{mode}"] = overhead * hand_over_torch
      # The same from the medians of the separate blocks of windows (drift not cancelled).
      rate = row[f"torch_{mode}_steps_per_sec"]
      row[f"vs_torch_{mode}_medians"] = row["research_steps_per_sec"] / rate
  return row


def torch_eager_rate(family: str, smoke: bool, windows: int) -> float:
  """PyTorch eager's median steps/s on the speed row's batches, in this process (run in
  one with glibc's default malloc: PyTorch as its users run it)."""
  from research import registry, torch_models

  config, window = family_config(family, smoke)
  dataset = registry.datasets.get(config.data.name)(config.data)
  trainer = torch_models.Trainer(family, config, host_batches(config, dataset), device="cpu")
  trainer.run(3)
  return median_rate([(window, trainer.run(window)) for _ in range(windows)])


def in_fresh_process(call: str, env: dict) -> dict:
  """Runs `bench.<call>` in a new Python process; its result, printed as JSON."""
  repo = Path(__file__).resolve().parent.parent
  code = (
    "import json; from research import runtime; runtime.tune_malloc(); "
    f"from research import bench; print(json.dumps(bench.{call}))"
  )
  done = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=repo
  )
  if done.returncode:
    raise RuntimeError(f"bench.{call} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def section_speed(families, smoke: bool, windows: int) -> dict:
  """(a) framework vs hand-written JAX, (b) vs PyTorch eager and compiled; each family in
  a fresh process with the XLA flags research.train gives its model."""
  rows = {}
  for family in families:
    call = f"speed_row({family!r}, {smoke!r}, {windows!r})"
    rows[family] = row = in_fresh_process(call, train_env(family, smoke))
    if "torch_eager_steps_per_sec" in row and row["torch_device"] == "cpu":
      call = f"torch_eager_rate({family!r}, {smoke!r}, {windows!r})"
      rate = in_fresh_process(call, dict(os.environ, RESEARCH_MALLOC_TUNING="0"))
      row["torch_eager_default_malloc_steps_per_sec"] = rate
      row["vs_torch_eager_default_malloc"] = row["research_steps_per_sec"] / rate
    logging.info("speed %s: %s", family, rows[family])
  return rows


def section_mfu(smoke: bool, windows: int, speed: dict | None) -> dict:
  """(c) MFU of the Transformer LM under research.train (the speed section's run, or a
  new one), over the matmul peak measured in the same process before and after."""
  from research import flops, registry

  config, _ = family_config("lm", smoke)
  row = (speed or {}).get("lm") or section_speed(("lm",), smoke, windows)["lm"]
  dataset = registry.datasets.get(config.data.name)(config.data)
  rate, peak = row["research_steps_per_sec"], row["peak_flops"]
  counts = flops.config_counts(config, dataset.model_kwargs)
  return {
    "shape": describe(config),
    "xla_flags": row["xla_flags"],
    "steps_per_sec": rate,
    "tokens_per_sec": rate * config.global_batch_size * config.data.seq_len,
    "peak_flops": peak,
    "peak_source": "jitted fp32 2048x2048 matmul in the same process, best of 10, before and after",
    "flops_per_step_6n": counts["six_n"],
    "flops_per_step_with_attention": counts["with_attention"],
    "mfu_6n": rate * counts["six_n"] / peak,
    "mfu_with_attention": rate * counts["with_attention"] / peak,
  }


INPUT_SECONDS_PER_WINDOW = 6  # the input rows' timed seconds per family, per --windows
INPUT_WINDOW_SEC = 0.1  # the forms alternate in windows of about this length


def input_row(family: str, smoke: bool, windows: int) -> dict:
  """(d) for one family, in this process: research.train's step fed by
  parallel.BatchFeeder against the same step on one fixed batch already on the device,
  in both of the feeder's forms (from the host; the dataset held on the device, where
  the dataset allows it); the config picks one.

  The forms take turns in windows of ~0.1 s (one CNN step), for ~6 s x `windows` in
  all: the shared machine's speed drifts over seconds, so each form's windows sit
  between the others' and the drift cancels in the ratio of their summed times (the
  earlier form, medians of 1 s windows bracketed by fixed ones, had a spread of +-5%
  per window and could not resolve 1%). As in research.train's loop, each step's batch
  is made while the step before it runs."""
  import jax

  from research import parallel, train

  prepared = FrameworkStep.build(family, smoke)
  config, loader, exp = prepared.config, prepared.loader, prepared.exp
  used = parallel.BatchFeeder(loader, exp.batch_sharding, config.data.device_resident_mb)
  forms = {"fixed": (prepared.step, lambda step: (prepared.batch,))}
  for name, megabytes in (("host", 0), ("resident", 2**20)):
    feeder = parallel.BatchFeeder(loader, exp.batch_sharding, megabytes)
    if name == "host" or feeder.device_resident:  # not with host-only pp_train ops
      forms[name] = (train.jit_train_step(exp, feeder), feeder)
  state, count = prepared.state, 0  # count = state.step: the resident form gathers by it

  def run(name: str, steps: int) -> float:  # untimed warm-up and step-time probe
    nonlocal state, count
    step_fn, source = forms[name]
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = step_fn(state, *source(count))
      count += 1
    jax.block_until_ready(metrics)
    return time.perf_counter() - t0

  for name in forms:
    run(name, 2)  # compile
  step_sec = run("fixed", 3) / 3
  window = 1 if smoke else max(1, round(INPUT_WINDOW_SEC / step_sec))
  budget = INPUT_SECONDS_PER_WINDOW * windows
  rounds = 2 if smoke else max(windows, math.ceil(budget / (len(forms) * window * step_sec)))
  schedule = [name for _ in range(rounds) for name in forms]
  planned = {name: [] for name in forms}  # the step numbers each form will run, in order
  for i, name in enumerate(schedule):
    planned[name].extend(range(count + i * window, count + (i + 1) * window))
  upcoming = {name: iter(steps) for name, steps in planned.items()}

  def feed(name: str):
    step = next(upcoming[name], None)
    return None if step is None else forms[name][1](step)

  pending = {name: feed(name) for name in forms}
  seconds = {name: [] for name in forms}
  for name in schedule:
    step_fn = forms[name][0]
    t0 = time.perf_counter()
    for _ in range(window):
      state, metrics = step_fn(state, *pending[name])
      pending[name] = feed(name)  # the next batch of this form, while this step runs
    jax.block_until_ready(metrics)
    seconds[name].append(time.perf_counter() - t0)
  # fed steps/s over fixed steps/s (the same number of steps), overall and in 5 blocks
  # of consecutive rounds (the spread shows the measure's noise)
  blocks = [range(i * rounds // 5, (i + 1) * rounds // 5) for i in range(5)] if rounds >= 5 else []
  ratios, block_ratios = {}, {}
  for name in forms:
    if name != "fixed":
      ratios[name] = sum(seconds["fixed"]) / sum(seconds[name])
      block_ratios[name] = [
        sum(seconds["fixed"][i] for i in b) / sum(seconds[name][i] for i in b) for b in blocks
      ]
  t0, n = time.perf_counter(), 0
  while time.perf_counter() - t0 < (0.2 if smoke else 2.0):
    loader(10_000 + n)
    n += 1
  loader_sec = (time.perf_counter() - t0) / n
  fixed_rate = window * rounds / sum(seconds["fixed"])
  wait = {
    form: max(0.0, 1.0 - ratios[form]) if form in ratios else None for form in ("host", "resident")
  }
  chosen = "resident" if used.device_resident else "host"
  return {
    "shape": describe(config),
    "pp_train": config.data.pp_train,
    "device_resident": used.device_resident,
    "window_steps": window,
    "rounds": rounds,
    "loader_examples_per_sec": config.global_batch_size / loader_sec,
    "loader_share_of_step": loader_sec * fixed_rate,  # the loader's time per batch / a step's
    "step_examples_per_sec": fixed_rate * config.global_batch_size,
    "train_examples_per_sec": fixed_rate * ratios[chosen] * config.global_batch_size,
    "wait_fraction": wait[chosen],
    "host_wait_fraction": wait["host"],
    "resident_wait_fraction": wait["resident"],
    "rate_over_fixed": ratios,
    "block_rate_over_fixed": block_ratios,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def section_input(families, smoke: bool, windows: int) -> dict:
  """(d) loader throughput, and training time spent waiting for data (input_row), each
  family in a fresh process with the XLA flags research.train gives its model."""
  rows = {}
  for family in families:
    call = f"input_row({family!r}, {smoke!r}, {windows!r})"
    rows[family] = in_fresh_process(call, train_env(family, smoke))
    logging.info("input %s: %s", family, rows[family])
  return rows


def section_checkpoint(smoke: bool, root: Path, repeats: int = 3) -> dict:
  """(e) loop blocking per asynchronous save, and restore time, by state size."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from research import checkpoint

  rows = {}
  for params in (10_000, 100_000) if smoke else (1_000_000, 10_000_000, 50_000_000):
    directory = root / f"checkpoint_{params}"
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=2)
    chunk = params // 4
    leaves = {f"w{i}": jnp.full((chunk,), float(i), jnp.float32) for i in range(4)}
    state = {"params": leaves, "mu": dict(leaves), "nu": dict(leaves)}
    state = jax.tree.map(lambda x: x + 1.0, state)  # distinct device buffers
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    ckpt.save(0, state, {})  # first save: directory and thread set-up
    ckpt.manager.wait_until_finished()
    blocked, written = [], []
    for i in range(1, repeats + 1):
      t0 = time.perf_counter()
      ckpt.save(i, state, {})
      blocked.append(time.perf_counter() - t0)
      ckpt.manager.wait_until_finished()
      written.append(time.perf_counter() - t0)
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restores = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      restored = ckpt.restore(repeats, abstract)
      jax.block_until_ready(restored)
      restores.append(time.perf_counter() - t0)
    assert np.array_equal(np.asarray(restored["nu"]["w3"]), np.asarray(state["nu"]["w3"]))
    ckpt.close()
    block = statistics.median(blocked)
    rows[str(params)] = {
      "parameters": params,
      "state_bytes": nbytes,
      "blocked_sec": block,
      "save_total_sec": statistics.median(written),
      "restore_sec": min(restores),
      "restore_mb_per_sec": nbytes / 1e6 / min(restores),
      "blocked_fraction_at_60s": block / 60.0,
    }
    logging.info("checkpoint %d: %s", params, rows[str(params)])
  return rows


MESH_DEVICES = 8


def checkpoint_mesh_row(smoke: bool, root: str, repeats: int = 3) -> dict:
  """Loop blocked per save of a ResNet-20's state (parameters, BatchNorm statistics, two
  Adam moments) replicated over MESH_DEVICES CPU devices (data parallel): the framework's
  array handler (checkpoint.use_array_handler) against Orbax's default, whose
  replica-parallel writes slice every replicated array once per replica. Run in a
  process with that many host devices."""
  import jax
  import jax.numpy as jnp

  from research import checkpoint, registry

  depth = 8 if smoke else 20
  model = registry.models.get("resnet_cifar")(depth=depth)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  shapes = jax.tree.map(lambda x: getattr(x, "value", x), shapes)  # unbox
  mesh = jax.make_mesh((MESH_DEVICES,), ("data",))
  replicated = jax.NamedSharding(mesh, jax.P())
  leaves = {"variables": shapes, "mu": shapes["params"], "nu": shapes["params"]}
  state = jax.tree.map(lambda x: jax.device_put(jnp.ones(x.shape, x.dtype), replicated), leaves)

  rows = {}
  # The framework's first: Orbax's default compiles its slices, which ours never uses.
  handlers = (
    ("research", checkpoint.use_array_handler),
    ("orbax", checkpoint.register_array_handler),
  )
  for name, register in handlers:
    ckpt = checkpoint.Checkpointer(Path(root) / f"mesh_{name}", max_to_keep=2)
    register()  # after the Checkpointer's own registration
    blocked = []
    for step in range(repeats + 1):
      t0 = time.perf_counter()
      ckpt.save(step, state, {})
      blocked.append(time.perf_counter() - t0)
      ckpt.manager.wait_until_finished()
    ckpt.close()
    rows[name] = {"first_blocked_sec": blocked[0], "blocked_sec": statistics.median(blocked[1:])}
  checkpoint.use_array_handler()
  arrays = jax.tree.leaves(state)
  return {
    "devices": MESH_DEVICES,
    "state": f"resnet_cifar(depth={depth}) variables + two Adam moments",
    "arrays": len(arrays),
    "state_bytes": sum(x.nbytes for x in arrays),
    **rows,
  }


STARTUP_RUNS = {  # family -> (config file, overrides)
  "cnn": ("experiments/mnist_cnn.py", ["--config.schedule.warmup_steps=1"]),
  "lm": ("experiments/shakespeare_char.py", ["--config.schedule.warmup_steps=1"]),
  "mlp": ("experiments/mnist_mlp.py", []),
}


def section_startup(families, root: Path) -> dict:
  """(f) first and second start of the same 2-step run in fresh processes, sharing a
  new compilation cache directory."""
  rows = {}
  repo = Path(__file__).resolve().parent.parent
  for family in families:
    config_file, overrides = STARTUP_RUNS[family]
    cache = root / f"cache_{family}"
    runs = []
    for attempt in ("cold", "warm"):
      workdir = root / f"startup_{family}_{attempt}"
      command = [
        sys.executable, "-m", "research.train", f"--config={repo / config_file}",
        f"--workdir={workdir}", "--config.num_train_steps=2", "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=2", *overrides,
      ]  # fmt: skip
      env = {**os.environ, "RESEARCH_COMPILATION_CACHE": str(cache)}
      t0 = time.perf_counter()
      done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=repo)
      wall = time.perf_counter() - t0
      if done.returncode:
        raise RuntimeError(f"startup run failed: {' '.join(command)}\n{done.stderr[-2000:]}")
      runs.append({"wall_sec": wall, **_timings(done.stderr)})
    cold, warm = runs
    rows[family] = {
      "command": f"python -m research.train --config={config_file} (2 steps)",
      "cold": cold,
      "warm": warm,
      # timings are logged to 10 ms: a warm 0.00 counts as 0.01
      "first_step_speedup": cold["first_step_sec"] / max(warm["first_step_sec"], 0.01),
      "compile_speedup": cold["compile_sec"] / max(warm["compile_sec"], 0.01),
      "process_speedup": cold["wall_sec"] / warm["wall_sec"],
    }
    logging.info("startup %s: %s", family, rows[family])
  return rows


def _timings(log: str) -> dict:
  """The [TIMING] lines of a research.train log: state init, first step and evaluation
  seconds."""
  found = {"first_step_sec": float("nan"), "compile_sec": float("nan"), "evaluator_sec": 0.0}
  found["init_compile_sec"] = float("nan")
  for line in log.splitlines():
    if "[TIMING] state init: compile" in line:
      found["init_compile_sec"] = float(line.split("compile", 1)[1].split("s,")[0].strip())
    elif "[TIMING] first step (compile + run)" in line:
      found["first_step_sec"] = float(line.rsplit(":", 1)[1].strip().rstrip("s"))
    elif "[TIMING] first step: trace + lower" in line:
      found["compile_sec"] = float(line.rsplit("compile", 1)[1].strip().rstrip("s"))
    elif "[TIMING] evaluator" in line:
      found["evaluator_sec"] += float(line.rsplit(":", 1)[1].strip().rstrip("s"))
  return found


XLA_SETTINGS = {  # name -> environment of the process that times the step
  # jaxlib's own: YNNPACK for single dots, convolutions and reductions
  "XLA defaults": {"RESEARCH_XLA_DEFAULTS": "0"},
  "XLA convolutions": {
    "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
  },
  "YNNPACK dot": {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"},
}


def step_time(family: str, smoke: bool, windows: int) -> float:
  """Median seconds per train step of the framework's jitted step on a batch already on
  the device (this process's XLA flags)."""
  import jax

  prepared = FrameworkStep.build(family, smoke)
  times = []
  for i in range(windows + 1):
    t0 = time.perf_counter()
    for _ in range(prepared.window):
      prepared.state, metrics = prepared.step(prepared.state, prepared.batch)
    jax.block_until_ready(metrics)
    if i:  # the first window compiles
      times.append((time.perf_counter() - t0) / prepared.window)
  return statistics.median(times)


def section_xla_flags(families, smoke: bool, windows: int, rounds: int = 2) -> dict:
  """The train step under each XLA CPU setting, each in a fresh process (XLA reads its
  flags once), the settings alternating over `rounds`; best round reported."""
  rows = {}
  for family in families:
    times = {name: [] for name in XLA_SETTINGS}
    for _ in range(rounds):
      for name, settings in XLA_SETTINGS.items():
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(settings)
        times[name].append(in_fresh_process(f"step_time({family!r}, {smoke!r}, {windows!r})", env))
    rows[family] = {name: min(values) for name, values in times.items()}
    logging.info("xla flags %s: %s", family, rows[family])
  return rows


def section_profile(families, smoke: bool) -> dict:
  """Where a train step's time goes, each family in a fresh process with the XLA flags
  research.train gives its model."""
  rows = {}
  for family in families:
    rows[family] = in_fresh_process(f"profile_row({family!r}, {smoke!r})", train_env(family, smoke))
    logging.info("profile %s: %s", family, rows[family])
  return rows


def op_sources(compiled) -> dict[str, str]:
  """XLA operation name -> the model code it came from (its op_name metadata)."""
  import re

  sources = {}
  for line in compiled.as_text().splitlines():
    found = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*op_name=\"([^\"]+)\"", line)
    if found:
      sources[found.group(1)] = found.group(2).replace("jit(train_step)/", "")
  return sources


def group_by_source(per_op: dict[str, float], sources: dict[str, str]):
  """Times per (operation kind, model code), layers alike: block_3 -> block_*,
  fusion.12 -> fusion."""
  import collections
  import re

  grouped = collections.Counter()
  for name, ms in per_op.items():
    source = re.sub(r"block_\d+", "block_*", sources.get(name, ""))
    grouped[(re.sub(r"\.\d+$", "", name), source)] += ms
  return grouped


def profile_row(family: str, smoke: bool) -> dict:
  """JAX's profiler over a few train steps: time per XLA operation (on the thread that
  runs it; see the report), grouped by the model code each came from."""
  import collections
  import glob
  import re

  import jax

  prepared = FrameworkStep.build(family, smoke)
  config, state, batch = prepared.config, prepared.state, prepared.batch
  compiled = prepared.step.lower(state, batch).compile()
  sources = op_sources(compiled)
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  steps = 3
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    wall = (time.perf_counter() - t0) / steps
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    profile = jax.profiler.ProfileData.from_file(path)
  per_op = collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      if "Eigen" not in line.name:  # XLA's compute threads
        continue
      for event in line.events:
        if event.name in sources or not re.search(r"Thunk|ThreadPool|Await", event.name):
          per_op[event.name] += event.duration_ns / 1e6 / steps
  total = sum(per_op.values())
  grouped = group_by_source(per_op, sources)
  return {
    "shape": describe(config),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "step_ms": 1e3 * wall,
    "op_cpu_ms": total,
    "top": [
      {"op": op, "source": source, "cpu_ms": ms, "share": ms / total}
      for (op, source), ms in grouped.most_common(10)
    ],
  }


# --- The run and its report.


def cpuinfo() -> dict[str, str]:
  """The first processor's fields in /proc/cpuinfo ({} where there is none)."""
  fields = {}
  with contextlib.suppress(OSError):
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if not line.strip():
        break
      key, _, value = line.partition(":")
      fields[key.strip()] = value.strip()
  return fields


def machine() -> dict:
  info = cpuinfo()
  cpu = info.get("model name") or platform.processor()
  if "cpu family" in info:  # "AMD EPYC" here has run a 2048^2 matmul at 477 GFLOP/s on
    # some days and 175-216 on others (on one of them family 25, model 17: Zen 4, whose
    # AVX-512 runs in 256-bit halves): the name alone does not say which CPU it was
    cpu += f" (family {info['cpu family']}, model {info.get('model')})"
  import jax

  return {
    "hostname": platform.node(),
    "cpu": cpu,
    "avx512f": "avx512f" in info.get("flags", "").split(),
    "cpu_count": os.cpu_count(),
    "platform": platform.platform(),
    "jax_devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def run(sections=SECTIONS, smoke: bool = False, out: str = "results/benchmarks",
        families=("mlp", "cnn", "lm"), windows: int = 5) -> dict:  # fmt: skip
  """Runs the sections; writes OUT.json and OUT.md; returns the results."""
  from research import torch_models
  from research.versions import versions

  unknown = set(sections) - set(SECTIONS)
  if unknown:
    raise config_lib.ConfigError(f"--sections: unknown {sorted(unknown)}; valid: {SECTIONS}")
  runtime.enable_compilation_cache()
  windows = 2 if smoke else windows
  results = {
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "command": " ".join(["python -m research.bench", *sys.argv[1:]]),
    "smoke": smoke,
    "machine": machine(),
    "versions": {**versions(), **torch_models.versions()},
    "goals": GOALS,
  }
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  markdown = out.with_suffix(".md")
  kept = ""  # a hand-written "## Discussion" at the end survives re-runs
  if markdown.exists() and "\n## Discussion" in markdown.read_text():
    kept = "\n## Discussion" + markdown.read_text().split("\n## Discussion", 1)[1]

  def save():  # after every section: a run cut short keeps what it measured
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    markdown.write_text(report(results) + kept)

  with tempfile.TemporaryDirectory(prefix="research_bench_") as tmp:
    root = Path(tmp)
    t0 = time.perf_counter()
    for section in sections:  # in the order given: a run cut short keeps the first ones
      if section == "xla_flags":
        chosen = ("mlp",) if smoke else families
        results[section] = section_xla_flags(chosen, smoke, windows, rounds=1 if smoke else 2)
      elif section == "speed":  # written after each family: a run cut short keeps them
        host_bound = () if smoke else ("mlp_host", "mlp_host_10")  # the loop's host time
        results[section] = {}
        for family in (*families, *host_bound):
          results[section].update(section_speed((family,), smoke, windows))
          results["bench_wall_sec"] = time.perf_counter() - t0
          save()
      elif section == "mfu":
        results[section] = section_mfu(smoke, windows, results.get("speed"))
      elif section == "input":
        results[section] = section_input((*families[:2], "cnn_augment"), smoke, windows)
      elif section == "checkpoint":
        results[section] = section_checkpoint(smoke, root)
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={MESH_DEVICES}"
        call = f"checkpoint_mesh_row({smoke!r}, {str(root)!r})"
        results["checkpoint_mesh"] = in_fresh_process(call, env)
      elif section == "startup":
        results[section] = section_startup(families[1:] if not smoke else ("mlp",), root)
      elif section == "profile":
        results[section] = section_profile(families[1:], smoke)
      results["bench_wall_sec"] = time.perf_counter() - t0
      save()
  save()
  return results


def report(results: dict) -> str:
  """results -> markdown: one table per section, each with its goal."""
  m = results["machine"]
  v = results["versions"]
  lines = [
    "# Benchmarks" + (" (smoke: tiny sizes, numbers mean nothing)" if results["smoke"] else ""),
    "",
    f"`{results['command']}` on {results['date']}: {m['cpu']}, {m['cpu_count']} cores, "
    f"devices {', '.join(m['jax_devices'])}; jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, "
    f"flax {v.get('flax')}, optax {v.get('optax')}, orbax {v.get('orbax-checkpoint')}, "
    f"torch {v.get('torch', 'not installed')}; XLA_FLAGS `{m['xla_flags']}`. "
    f"Whole run: {results['bench_wall_sec'] / 60:.1f} min.",
    "",
  ]
  settings = results.get("xla_flags")
  if settings:
    names = list(XLA_SETTINGS)
    lines += [
      "## XLA CPU kernels: milliseconds per train step (fresh process each, best of 2)",
      "",
      "research.train's defaults: `research.runtime.CPU_FLAGS` (XLA convolutions), and by "
      "model `MODEL_CPU_FLAGS` (YNNPACK dot for the LM). *XLA defaults*: jaxlib's own, "
      "YNNPACK for single dots, convolutions and reductions.",
      "",
      "| family | " + " | ".join(names) + " |",
      "|---|" + "---|" * len(names),
    ]
    for family, r in settings.items():
      best = min(r.values())
      cells = [f"**{1e3 * r[n]:.1f}**" if r[n] == best else f"{1e3 * r[n]:.1f}" for n in names]
      lines.append(f"| {family} | " + " | ".join(cells) + " |")
    lines.append("")
  speed = results.get("speed")
  if speed:
    lines += [
      "## Speed: research.train vs hand-written JAX vs PyTorch (steps/s: median window)",
      "",
      f"Goals: {GOALS['overhead']}; {GOALS['pytorch']}.",
      "",
      "PyTorch runs in the same process as both JAX loops, with the framework's malloc "
      "settings (research.runtime.tune_malloc), which speed it up too; *default malloc*: "
      "PyTorch eager alone in a process with glibc's defaults, as its users run it. "
      "*mlp_host*: an MLP so small (one hidden layer of 8) that a step takes ~0.15 ms and "
      "the loops' own host time per step shows, as on a GPU for small models; "
      "*mlp_host_10*: the same with `config.steps_per_dispatch=10` (ten steps per jitted "
      "call; the hand loop and PyTorch still take one). *vs eager*, *vs compile*: "
      "research.train over the hand loop (its windows bracketed by the hand loop's) "
      "times the hand loop over PyTorch (PyTorch's windows of ~1 s alternating with the "
      "hand loop's, 15 of each for eager): two side-by-side ratios of summed window "
      "times, the machine's drift cancelled in each; the steps/s columns are medians of "
      "windows taken minutes apart.",
      "",
      "| family | shape | XLA flags | research.train | hand JAX | ratio | torch eager "
      "| torch.compile | vs eager | vs compile | torch eager, default malloc | vs it |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family, r in speed.items():
      lines.append(
        f"| {family} | {r['shape']} | `{r['xla_flags'] or '-'}` "
        f"| {r['research_steps_per_sec']:.2f} "
        f"| {r['hand_jax_steps_per_sec']:.2f} | **{r['overhead_ratio']:.3f}** "
        f"| {_num(r.get('torch_eager_steps_per_sec'))} "
        f"| {_num(r.get('torch_compile_steps_per_sec'))} "
        f"| **{_num(r.get('vs_torch_eager'))}x** | {_num(r.get('vs_torch_compile'))}x "
        f"| {_num(r.get('torch_eager_default_malloc_steps_per_sec'))} "
        f"| {_num(r.get('vs_torch_eager_default_malloc'))}x |"
      )
    lines.append("")
  mfu = results.get("mfu")
  if mfu:
    lines += [
      "## MFU: Transformer LM under research.train",
      "",
      f"Goal: {GOALS['mfu']}. Peak: {mfu['peak_flops'] / 1e9:.0f} GFLOP/s ({mfu['peak_source']}).",
      "",
      "| shape | steps/s | tokens/s | FLOPs/step 6N | with attention | MFU 6N "
      "| MFU with attention |",
      "|---|---|---|---|---|---|---|",
      f"| {mfu['shape']} | {mfu['steps_per_sec']:.3f} | {mfu['tokens_per_sec']:.0f} "
      f"| {mfu['flops_per_step_6n'] / 1e9:.1f} G "
      f"| {mfu['flops_per_step_with_attention'] / 1e9:.1f} G "
      f"| {100 * mfu['mfu_6n']:.1f}% | **{100 * mfu['mfu_with_attention']:.1f}%** |",
      "",
    ]
  data = results.get("input")
  if data:
    lines += [
      "## Input pipeline",
      "",
      f"Goal: {GOALS['input']}. Waiting = 1 - (steps/s with the batches research.train "
      "feeds) / (steps/s fed one batch already on the device): the same step, the forms "
      "taking turns in windows of ~0.1 s over ~30 s (their summed times compared; the "
      "range is the waiting, signed, in five blocks of consecutive rounds: the measure's "
      "noise). `parallel.BatchFeeder` holds an in-memory dataset on the device and the step "
      "gathers its batch there and applies pp_train's pad, crops and flips, from numbers "
      "the host draws (up to `config.data.device_resident_mb`); otherwise each step's "
      "rows come from the host, "
      "made while the step before runs. Both forms are timed; **waiting** is the one "
      "research.train uses. *Loader / step*: the loader's time per batch over a step's, "
      "what feeding could cost if nothing overlapped.",
      "",
      "| family | pp_train | loader examples/s | step examples/s | loader / step "
      "| trained examples/s | data on the device | **waiting** | in five blocks "
      "| from the host | held on the device |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    percent = lambda x: "-" if x is None else f"{100 * x:.2f}%"  # noqa: E731
    for family, r in data.items():
      host = r.get("host_wait_fraction", None if r.get("device_resident") else r["wait_fraction"])
      pp = (r["pp_train"] or "-").replace("|", "\\|")  # a table cell
      used = "resident" if r["device_resident"] else "host"
      blocks = [1 - x for x in r.get("block_rate_over_fixed", {}).get(used, [])]  # signed
      spread = f"{percent(min(blocks))} to {percent(max(blocks))}" if blocks else "-"
      share = r.get("loader_share_of_step")
      lines.append(
        f"| {family} | `{pp}` "
        f"| {r['loader_examples_per_sec']:.0f} | {r['step_examples_per_sec']:.0f} "
        f"| {percent(share)} | {r['train_examples_per_sec']:.0f} "
        f"| {'yes' if r['device_resident'] else 'no'} "
        f"| **{percent(r['wait_fraction'])}** | {spread} | {percent(host)} "
        f"| {percent(r.get('resident_wait_fraction'))} |"
      )
    lines.append("")
  ckpt = results.get("checkpoint")
  if ckpt:
    lines += [
      "## Checkpointing (Orbax, asynchronous; state = parameters + two Adam moments)",
      "",
      f"Goal: {GOALS['checkpoint']}.",
      "",
      "| parameters | state MB | loop blocked | save until written | share of 60 s "
      "| restore | restore MB/s |",
      "|---|---|---|---|---|---|---|",
    ]
    for r in ckpt.values():
      lines.append(
        f"| {r['parameters']:,} | {r['state_bytes'] / 1e6:.0f} | {1e3 * r['blocked_sec']:.0f} ms "
        f"| {r['save_total_sec']:.2f} s | **{100 * r['blocked_fraction_at_60s']:.2f}%** "
        f"| {r['restore_sec']:.2f} s | {r['restore_mb_per_sec']:.0f} |"
      )
    lines.append("")
  mesh = results.get("checkpoint_mesh")
  if mesh:
    ours, orbax = mesh["research"], mesh["orbax"]
    lines += [
      f"On {mesh['devices']} CPU devices, data parallel: {mesh['state']}, {mesh['arrays']} "
      f"arrays, {mesh['state_bytes'] / 1e6:.1f} MB, replicated. Loop blocked per save by "
      "the framework's array handler (one replica writes each array in a single process) "
      "and by Orbax's default (every replica writes a slice of every replicated array):",
      "",
      "| array handler | first save | later saves | share of 60 s |",
      "|---|---|---|---|",
    ]
    for name, r in (("research (checkpoint.use_array_handler)", ours), ("Orbax default", orbax)):
      lines.append(
        f"| {name} | {1e3 * r['first_blocked_sec']:.0f} ms | {1e3 * r['blocked_sec']:.0f} ms "
        f"| **{100 * r['blocked_sec'] / 60:.2f}%** |"
      )
    lines.append("")
  startup = results.get("startup")
  if startup:
    lines += [
      "## Start-up: compile, and the second start with the persistent compilation cache",
      "",
      f"Goal: {GOALS['startup']}. XLA compile = the train step's compilation (a cache "
      "load when warm); first step = tracing, lowering, compiling and running it, as "
      "research.train logs them; state init = lowering and compiling the train state's "
      "initialisation; process = the whole command (imports, data, 2 steps, final "
      "evaluation, checkpoint).",
      "",
      "| run | XLA compile cold / warm | speed-up | first step cold / warm | speed-up "
      "| state init cold / warm | evaluation cold / warm | process cold / warm | speed-up |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in startup.values():
      cold, warm = r["cold"], r["warm"]
      init = [run.get("init_compile_sec", float("nan")) for run in (cold, warm)]
      lines.append(
        f"| `{r['command']}` | {cold['compile_sec']:.2f} / {warm['compile_sec']:.2f} s "
        f"| **{r['compile_speedup']:.1f}x** "
        f"| {cold['first_step_sec']:.2f} / {warm['first_step_sec']:.2f} s "
        f"| **{r['first_step_speedup']:.1f}x** | {init[0]:.2f} / {init[1]:.2f} s "
        f"| {cold['evaluator_sec']:.1f} / {warm['evaluator_sec']:.1f} s "
        f"| {cold['wall_sec']:.1f} / {warm['wall_sec']:.1f} s | {r['process_speedup']:.2f}x |"
      )
    lines.append("")
  profile = results.get("profile")
  if profile:
    lines += [
      "## Where the time goes: JAX profiler, time per XLA operation in one train step",
      "",
      "Each operation's time as the profiler records it: once, on the thread that runs it, "
      "from its start to its end (the share it hands to XLA's other compute threads is not "
      "counted again), so about its wall time; operations running side by side on two "
      "threads can add up to more than the step. Operations without a trace name (XLA's "
      "convolution thunks) are in the step's remainder.",
      "",
    ]
    for family, r in profile.items():
      lines += [
        f"**{family}**: {r['shape']}; step {r['step_ms']:.0f} ms wall, "
        f"{r['op_cpu_ms']:.0f} ms in named operations.",
        "",
        "| operation | from | ms | share |",
        "|---|---|---|---|",
      ]
      for op in r["top"]:
        lines.append(
          f"| `{op['op']}` | `{op['source'][:70]}` | {op['cpu_ms']:.1f} "
          f"| {100 * op['share']:.1f}% |"
        )
      lines.append("")
  return "\n".join(lines)


def _num(value, fmt: str = ".2f") -> str:
  return "-" if value is None else format(value, fmt)


def define_flags():
  flags.DEFINE_list("sections", list(SECTIONS), f"Which of {', '.join(SECTIONS)}.")
  flags.DEFINE_bool("smoke", False, "Tiny sizes and few steps: checks the benchmark runs.")
  flags.DEFINE_string("out", "results/benchmarks", "Output path without suffix (.md, .json).")
  flags.DEFINE_integer("windows", 5, "Timing windows per measurement (median reported).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  values = flags.FLAGS
  runtime.tune_malloc()  # as research.train does, before JAX starts its threads
  try:
    results = run(tuple(values.sections), values.smoke, values.out, windows=values.windows)
  except config_lib.ConfigError as e:
    return cli.usage_error(str(e))
  print(report(results))


if __name__ == "__main__":
  define_flags()
  app.run(main)
