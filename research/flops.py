"""Model FLOPs per training step, from documented formulas (for MFU).

Transformer LM (decoder, per step of B sequences of S tokens; W width, L
layers, F = mlp_ratio * W, V vocabulary), counting a multiply-add as 2 FLOPs
and the backward pass as twice the forward (so x3), as Kaplan et al. and
MaxText do:

- `six_n`: 6 * N * B * S with N the parameters of every matrix multiply:
  L * (4 W^2 + 2 W F) in the blocks plus V * W for the output logits (the
  token and position embeddings are lookups: no FLOPs).
- `with_attention`: six_n plus the attention scores and their use on the values,
  3 * 2 * 2 * L * B * S^2 * W, halved for causal attention (MaxText's
  "causal" count: only the lower triangle is computed in principle).

MFU = model FLOPs per second / peak FLOPs per second of the devices.

Other models (`per_device_per_step`): XLA's own count of the compiled train
step (its cost analysis of the partitioned program, so per device): every
multiply-add of the forward and backward passes, as written.

Peak per device (`peak_per_device`): the vendor's dense peak for known
accelerators (`PEAKS`, by device kind and dtype); on the CPU, a jitted fp32
2048x2048 matmul, shared by its local devices: measured in the process, or by an
earlier one in the last 10 minutes on the same machine, devices and XLA flags.
"""

from __future__ import annotations

import functools
import time

# Dense peak FLOP/s per chip, from the vendors' data sheets (bf16; float32 where listed).
PEAKS = {
  ("h100", "bfloat16"): 989e12,  # SXM
  ("h100", "float32"): 67e12,
  ("h200", "bfloat16"): 989e12,
  ("h200", "float32"): 67e12,
  ("a100", "bfloat16"): 312e12,
  ("a100", "float32"): 19.5e12,
  ("tpu v4", "bfloat16"): 275e12,
  ("tpu v5 lite", "bfloat16"): 197e12,
  ("tpu v5e", "bfloat16"): 197e12,
  ("tpu v5p", "bfloat16"): 459e12,
  ("tpu v6", "bfloat16"): 918e12,
}


def transformer_lm(batch: int, seq_len: int, num_layers: int, width: int, mlp_ratio: float,
                   vocab_size: int, causal: bool = True) -> dict[str, float]:  # fmt: skip
  """{'params_matmul', 'six_n', 'with_attention'}: FLOPs per training step."""
  hidden = mlp_ratio * width
  matmul_params = num_layers * (4 * width * width + 2 * width * hidden) + vocab_size * width
  tokens = batch * seq_len
  six_n = 6.0 * matmul_params * tokens
  attention = 3 * 2 * 2 * num_layers * batch * seq_len * seq_len * width
  if causal:
    attention /= 2
  return {"params_matmul": matmul_params, "six_n": six_n, "with_attention": six_n + attention}


def measured_peak(size: int = 2048, dtype: str = "float32", repeats: int = 10) -> float:
  """FLOP/s of a jitted size x size matmul on the default device (best of `repeats`)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (size, size), getattr(jnp, dtype))
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * size**3 / best


def config_counts(config, model_kwargs: dict) -> dict[str, float] | None:
  """transformer_lm()'s counts for a config's step, where a formula is known (the
  Transformer LM); None otherwise."""
  if config.model.name != "transformer_lm":
    return None
  model = {**model_kwargs, **{k: v for k, v in config.model.items() if k != "name"}}
  return transformer_lm(
    config.global_batch_size, config.data.seq_len, model.get("num_layers", 4),
    model.get("embed_dim", 128), model.get("mlp_ratio", 4),
    max(model["vocab_size"], model.get("pad_vocab_to", 0)),  # the logits' rows
  )  # fmt: skip


def config_flops(config, model_kwargs: dict) -> float | None:
  """Formula FLOPs per step (all devices) of a config: the attention-inclusive count."""
  counts = config_counts(config, model_kwargs)
  return counts["with_attention"] if counts else None


def compiled_flops(compiled) -> float | None:
  """XLA's FLOP count of a compiled program (per device), or None if it gives none."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # noqa: BLE001  some backends have no cost analysis
    return None
  if isinstance(analysis, list | tuple):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


# A CPU peak measured by an earlier process within this many seconds, on the same
# machine, devices and XLA flags, is reused: measuring takes 11 matmuls (0.4 s at 477
# GFLOP/s, 1.0 s on a loaded machine), a large share of a short run's start.
PEAK_REUSE_SECONDS = 600


def reused_peak(key: dict, measure, path, now: float | None = None) -> tuple[float, float]:
  """(peak, when it was measured): the one stored at `path` under `key` if measured
  within PEAK_REUSE_SECONDS, else `measure()`'s, stored there (path None: no reuse)."""
  import json

  from research.data.sources import write_atomically

  now = time.time() if now is None else now
  if path is not None:
    try:
      stored = json.loads(path.read_text())
      if stored["key"] == key and 0 <= now - stored["time"] < PEAK_REUSE_SECONDS:
        return float(stored["peak"]), float(stored["time"])
    except (OSError, ValueError, KeyError, TypeError):
      pass  # none yet, or unreadable: measure
  peak = measure()
  if path is not None:  # a concurrent reader sees the old file or the new one
    record = json.dumps({"key": key, "time": now, "peak": peak})
    write_atomically(path, lambda partial: partial.write_text(record))
  return peak, now


def cpu_peak_file():
  """Where CPU peaks are kept for reuse: beside the compilation cache (None when off)."""
  from research import runtime

  cache = runtime.compilation_cache_dir()
  return cache.with_name(f"{cache.name}_cpu_peak.json") if cache else None


@functools.cache
def peak_per_device(dtype: str = "float32") -> tuple[float, str]:
  """(peak FLOP/s of one device, where the number comes from)."""
  import datetime
  import os
  import platform

  import jax

  device = jax.local_devices()[0]
  kind = device.device_kind.lower()
  if device.platform == "cpu":
    count = jax.local_device_count()
    key = {
      "host": platform.node(), "cpu": platform.processor() or platform.machine(),
      "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
      "devices": count, "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__,
    }  # fmt: skip
    peak, when = reused_peak(key, measured_peak, cpu_peak_file())
    at = datetime.datetime.fromtimestamp(when).strftime("%H:%M:%S")
    return peak / count, f"measured at {at}: fp32 2048x2048 matmul / {count} device(s)"
  for (name, table_dtype), peak in PEAKS.items():
    if name in kind and table_dtype == dtype:
      return peak, f"data sheet: {device.device_kind} {dtype}"
  peak = measured_peak(dtype=dtype)
  return peak, f"measured: {dtype} 2048x2048 matmul on {device.device_kind}"
