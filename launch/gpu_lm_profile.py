"""The GPT-2-shaped LM's train step on one accelerator: step time and MFU by attention
implementation and batch, then where the time goes (JAX's profiler, per device kernel).

    python launch/gpu_lm_profile.py OUT_DIR [--smoke]
    VARIANTS="cudnn:32 cudnn:64" python launch/gpu_lm_profile.py OUT_DIR   # attention:batch
    VARIANTS="cudnn:32 cudnn:32:cublaslt" python launch/gpu_lm_profile.py OUT_DIR
        # attention:batch:options, OPTION_SETS below: XLA options for the step's compile,
        # or CODE_OPTIONS: the step traced with another form of a layer or the loss
    LM_SIZE=gpt2_124m python launch/gpu_lm_profile.py OUT_DIR   # GPT-2's vocabulary: 124M

Prints a table; writes OUT_DIR/lm_profile.json. A diagnostic for
results/benchmarks_gpu.md, run by hand on a GPU machine.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax

from research import bench, experiment, flops, losses, parallel, runtime, train
from research import config as config_lib


def lm_size() -> str:
  """$LM_SIZE: the shakespeare_char size profiled (gpt2, or gpt2_124m: GPT-2's padded
  vocabulary, 124M parameters)."""
  return os.environ.get("LM_SIZE", "gpt2")


def build(attention: str, batch: int, smoke: bool):
  config = config_lib.load_file(f"experiments/shakespeare_char.py:size={lm_size()}")
  config.model.attention = attention
  config.global_batch_size = batch
  if smoke:
    config.model.num_layers, config.model.embed_dim, config.model.num_heads = 1, 32, 2
    config.data.seq_len = config.model.max_len = 32
  t0 = time.perf_counter()
  exp = experiment.build(config)
  loader = exp.dataset.train_loader(config.global_batch_size, config.seed)
  batch_arrays = parallel.global_batch(loader(0), exp.batch_sharding)
  t1 = time.perf_counter()
  state = experiment.fresh_state(exp)
  t2 = time.perf_counter()
  lowered = train.jit_train_step(exp).lower(state, batch_arrays)
  step = lowered.compile()
  seconds = {"build": t1 - t0, "state_init": t2 - t1, "step_compile": time.perf_counter() - t2}
  print(f"{attention} batch {batch}: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
  return config, exp, lowered, step, state, batch_arrays, seconds


# For the kernel table only: XLA runs a GPU step's kernels as CUDA graphs (command
# buffers), whose kernels the profiler names by the graph ("command_buffer_1", as on
# 2026-11-26), not by the XLA operation each ran for. Without them, each kernel's
# hlo_op names its fusion, hence its model code.
PROFILE_COMPILER_OPTIONS = {"xla_gpu_enable_command_buffer": ""}

# XLA options a variant compiles its step with (the third field of a VARIANTS entry),
# from the same lowered program and train state as the variant before it where those
# match: XLA's GPU fusions and library calls that might take the elementwise work
# (~11 ms of the 85.8M LM's 43.5 ms of kernels on 2026-11-26) into fewer passes.
OPTION_SETS = {
  "default": {},
  "cublaslt": {"xla_gpu_enable_cublaslt": True},  # cuBLASLt: epilogues fused into matmuls
  "block_level": {"xla_gpu_experimental_enable_fusion_block_level_rewriter": True},
  "cudnn_layer_norm": {"xla_gpu_enable_cudnn_layer_norm": True},
  "no_command_buffer": PROFILE_COMPILER_OPTIONS,  # kernels one by one: the gaps' cost
}


@contextlib.contextmanager
def xent_passes(one_pass: bool):
  """The cross-entropy's max, sum and the accuracy's argmax in one pass over the logits
  (losses.logsumexp_argmax) or in two reductions and an argmax, on this backend, while
  the step is traced (the default: losses.ONE_PASS_XENT_BACKENDS, one pass on GPUs)."""
  saved = losses.ONE_PASS_XENT_BACKENDS
  losses.ONE_PASS_XENT_BACKENDS = frozenset({jax.default_backend()} if one_pass else ())
  try:
    yield
  finally:
    losses.ONE_PASS_XENT_BACKENDS = saved


# Code a variant traces its step with (also the third field of a VARIANTS entry): a new
# program, so the variant builds its own step and state.
CODE_OPTIONS = {
  "xent_one_pass": lambda: xent_passes(True),
  "xent_two_pass": lambda: xent_passes(False),
}


def parse_variants(text: str) -> list[tuple[str, int, str]]:
  """'cudnn:32 cudnn:32:cublaslt' -> [(attention, batch, option set), ...]."""
  variants = []
  for entry in text.split():
    attention, batch, options = (entry.split(":") + ["default"])[:3]
    if options not in OPTION_SETS and options not in CODE_OPTIONS:
      valid = ", ".join([*OPTION_SETS, *CODE_OPTIONS])
      raise SystemExit(f"VARIANTS entry {entry!r}: options {options!r}: valid: {valid}")
    variants.append((attention, int(batch), options))
  return variants


def time_steps(step, state, batch, steps: int = 0, seconds: float = 0.0):
  """Seconds per step over `steps` steps, or over as many as fill `seconds` (sustained:
  research.train's log windows span seconds, and a GPU's clock may drop under load)."""
  for _ in range(2):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  done = 0
  while done < steps or (seconds and time.perf_counter() - t0 < seconds):
    state, metrics = step(state, batch)
    done += 1
    if seconds and done % 10 == 0:
      jax.block_until_ready(metrics)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - t0) / done, state


def kernel_table(step, state, batch, steps: int = 3, top: int = 25) -> tuple[dict, object]:
  """Device time per XLA operation (with the model code it came from) and per kernel,
  over `steps` steps, from the accelerator planes of JAX's profiler; and the state
  after them (the step donates its input state)."""
  sources = bench.op_sources(step)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(steps):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    profile = jax.profiler.ProfileData.from_file(path)
  by = {"op": collections.Counter(), "kernel": collections.Counter()}
  row_sources = {}  # a row's name -> the model code of the XLA op it ran for
  planes = []
  for plane in profile.planes:
    planes.append((plane.name, [line.name for line in plane.lines][:12]))
    if "GPU" not in plane.name and "TPU" not in plane.name:
      continue
    for line in plane.lines:
      table = "op" if line.name == "XLA Ops" else "kernel" if "Stream" in line.name else None
      if table:
        for event in line.events:
          name = op = event.name
          if table == "kernel":  # the XLA op it ran for, where the profiler says
            try:
              stats = dict(event.stats)
            except (TypeError, ValueError):  # a profiler whose stats are not pairs
              stats = {}
            op = stats.get("hlo_op") or stats.get("tf_op") or name
            name = f"{name} [{op}]" if op != name else name
          by[table][name] += event.duration_ns / 1e6 / steps
          row_sources[name] = sources.get(op, "")
  result = {"planes": planes}
  # Rows by (name, model code), layers alike in one row: block_3 -> block_*, and a
  # kernel's "[custom-call.98]" -> "[custom-call]", an op's "fusion.12" -> "fusion".
  by_source = collections.Counter()  # device time by model code alone
  for table, counter in by.items():
    grouped = collections.Counter()
    for name, ms in counter.items():
      source = re.sub(r"block_\d+", "block_*", row_sources.get(name, ""))
      grouped[(re.sub(r"\.\d+(\]?)$", r"\1", name), source)] += ms
      if table == "kernel":
        by_source[source or "(no source)"] += ms
    total = sum(counter.values())
    result[f"{table}_total_ms"] = total
    result[table] = [
      {"name": n[:90], "source": src[:120], "ms_per_step": ms, "share": ms / max(total, 1e-9)}
      for (n, src), ms in grouped.most_common(top)
    ]
  result["source"] = [
    {"source": src[:160], "ms_per_step": ms} for src, ms in by_source.most_common(top)
  ]
  return result, state


def print_kernels(kernels: dict) -> None:
  for table in ("op", "kernel"):
    print(f"-- per {table}: {kernels[f'{table}_total_ms']:.1f} ms per step", flush=True)
    for r in kernels[table]:
      print(f"{r['ms_per_step']:8.2f} ms {100 * r['share']:5.1f}% {r['name']}  {r['source']}")
  print("-- per model code (all kernels)", flush=True)
  for r in kernels["source"]:
    print(f"{r['ms_per_step']:8.2f} ms {r['source']}")


def main():
  """The first variant that runs is profiled at once, and the JSON is rewritten after
  every variant: a run stopped by its time limit (a slow cuDNN compile) keeps both."""
  out = Path(sys.argv[1])
  smoke = "--smoke" in sys.argv
  # research.train's cache: a gpt2 run after this one skips compiling the same state init.
  runtime.enable_compilation_cache()
  out.mkdir(parents=True, exist_ok=True)
  results = {"device": str(jax.devices()[0].device_kind), "variants": []}
  write = lambda: (out / "lm_profile.json").write_text(json.dumps(results, indent=1) + "\n")  # noqa: E731
  # cuDNN's first: the variant the gpt2 config runs on a GPU (attention="auto"), the one
  # the first try (2026-11-25) did not reach before its time limit.
  variants = parse_variants(os.environ.get("VARIANTS") or "cudnn:32 xla:32 cudnn:64 einsum:32")
  best = None
  built_for = None  # the (attention, batch, code option) the names below were built for
  for attention, batch, options in variants:
    code = options if options in CODE_OPTIONS else "default"
    xla_options = OPTION_SETS.get(options, {})
    try:
      if built_for != (attention, batch, code):
        built_for, state = None, None  # the previous state's memory first
        with CODE_OPTIONS.get(code, contextlib.nullcontext)():
          config, exp, lowered, built_step, state, arrays, built_setup = build(
            attention, batch, smoke
          )
        built_for = (attention, batch, code)
      step, setup = built_step, built_setup
      if xla_options:  # the same program and state, other XLA options
        t0 = time.perf_counter()
        step = lowered.compile(compiler_options=xla_options)
        setup = {**setup, "step_compile": time.perf_counter() - t0}
      seconds, state = time_steps(step, state, arrays, 3 if smoke else 10)
      sustained, state = time_steps(step, state, arrays, seconds=0.2 if smoke else 5.0)
    except Exception as e:  # noqa: BLE001  a variant this machine cannot run
      built_for = None  # its state may be donated: the next variant builds its own
      results["variants"].append(
        {"attention": attention, "batch": batch, "options": options, "error": str(e)[:300]}
      )
      print(
        f"{attention:7s} batch {batch} {options}: {type(e).__name__}: {str(e)[:200]}", flush=True
      )
      write()
      continue
    model_flops = flops.config_flops(config, exp.dataset.model_kwargs)
    peak, source = flops.peak_per_device(config.dtype)
    row = {
      "size": lm_size(), "attention": attention, "batch": batch, "options": options,
      "compiler_options": {k: str(v) for k, v in xla_options.items()},
      "step_ms": 1e3 * seconds, "tflops": model_flops / seconds / 1e12,
      "mfu": model_flops / seconds / peak, "step_ms_sustained_5s": 1e3 * sustained,
      "mfu_sustained_5s": model_flops / sustained / peak, "peak": source, "setup_seconds": setup,
    }  # fmt: skip
    results["variants"].append(row)
    print(json.dumps(row), flush=True)
    first = "kernels" not in results
    if first or row["mfu"] > best["mfu"]:
      best = row
      results["profile_of"] = row
      profile_options = {**xla_options, **PROFILE_COMPILER_OPTIONS}
      profiled = lowered.compile(compiler_options=profile_options)
      results["kernels"], state = kernel_table(profiled, state, arrays)
      results["kernels"]["compiler_options"] = {k: str(v) for k, v in profile_options.items()}
      print_kernels(results["kernels"])
      del profiled
    write()
    del step


if __name__ == "__main__":
  main()
