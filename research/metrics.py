"""Writers: metrics.jsonl (the source of truth for results), TensorBoard events, log lines."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

from absl import logging


class MetricWriter:
  """Appends one JSON object per log or eval step and mirrors it to TensorBoard.

  Only the process that is given `enabled=True` (process 0) writes anything.
  """

  def __init__(self, workdir: str | Path, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tensorboard = None
    if enabled:
      SummaryWriter = summary_writer_class()  # noqa: N806  lazy: the writing process only
      path = Path(workdir) / "metrics.jsonl"
      torn = path.exists() and path.stat().st_size and _last_byte(path) != b"\n"
      self._jsonl = open(path, "a")
      if torn:  # a kill mid-write left half a line: start the next record on its own line
        self._jsonl.write("\n")
      self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))

  def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    record = {"step": int(step), "split": split, "time": time.time(), "metrics": metrics}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tensorboard.add_scalar(f"{split}/{name}", value, int(step))
    self._tensorboard.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


def summary_writer_class():
  """tensorboardX's SummaryWriter, loaded without PyTorch.

  tensorboardX imports torch whenever it is installed, only to accept torch tensors
  (this writer passes floats): 1.0 s and 190 MB at every start of a run in an
  environment with PyTorch. Hidden while tensorboardX loads; importable after.
  """
  import sys

  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter

    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError meanwhile
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def _last_byte(path: Path) -> bytes:
  with open(path, "rb") as f:
    f.seek(-1, 2)
    return f.read(1)


def read_jsonl(path: str | Path) -> list[dict]:
  """The records of a metrics.jsonl, one per (split, step), in step order of first writing.

  A resumed run logs again the steps after its checkpoint (bitwise the same
  values); the later record wins. A line torn by a kill is skipped with a warning.
  """
  records: dict[tuple[str, int], dict] = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        logging.warning("%s:%d: skipping a torn line (a kill mid-write)", path, number)
        continue
      records[(record["split"], record["step"])] = record
  return list(records.values())


class Progress:
  """Throughput, FLOP rate, MFU and ETA over the steps since the last report.

  `tokens_per_step`: targets per step for sequence models (0: not reported).
  `flops_per_device_step`: model FLOPs of one step on one device (research.flops);
  with `peak_per_device` (FLOP/s) gives the model FLOPs utilisation (MFU).
  """

  def __init__(
    self,
    first_step: int,
    total_steps: int,
    examples_per_step: int,
    tokens_per_step: int = 0,
    flops_per_device_step: float | None = None,
    peak_per_device: float | None = None,
  ):
    self.total_steps = total_steps
    self.examples_per_step = examples_per_step
    self.tokens_per_step = tokens_per_step
    self.flops_per_device_step = flops_per_device_step
    self.peak_per_device = peak_per_device
    self._last_step, self._last_time = first_step, time.perf_counter()

  def report(self, step: int) -> dict[str, float]:
    """Speed over the steps since the last report; {} when none ran since (the first
    step, which the meter starts after: its compile is not a rate)."""
    if step == self._last_step:
      return {}
    now = time.perf_counter()
    steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta = (self.total_steps - step) / max(steps_per_sec, 1e-9)
    speed = {
      "steps_per_sec": steps_per_sec,
      "examples_per_sec": steps_per_sec * self.examples_per_step,
      "eta_sec": eta,
    }
    if self.tokens_per_step:
      speed["tokens_per_sec"] = steps_per_sec * self.tokens_per_step
    if self.flops_per_device_step:
      speed["tflops_per_device"] = steps_per_sec * self.flops_per_device_step / 1e12
      if self.peak_per_device:
        speed["mfu"] = speed["tflops_per_device"] * 1e12 / self.peak_per_device
    return speed

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` of the loop's time (spent on something else) out of the rate."""
    self._last_time += seconds


def step_memory(compiled) -> dict[str, int]:
  """XLA's plan for a compiled step on one device, in bytes: its `arguments` (the train
  state and batch), `outputs`, the outputs `donated` into arguments' buffers,
  `temporaries`, and `total` = arguments + outputs - donated + temporaries, MaxText's
  count of the memory a step needs ({} where XLA gives no plan)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  plan = {
    "arguments": stats.argument_size_in_bytes,
    "outputs": stats.output_size_in_bytes,
    "donated": stats.alias_size_in_bytes,
    "temporaries": stats.temp_size_in_bytes,
  }
  plan["total"] = plan["arguments"] + plan["outputs"] - plan["donated"] + plan["temporaries"]
  return plan


def memory_line(plan: dict[str, int], device_stats: dict | None) -> str:
  """One line of step_memory's plan, with the device's size where it reports one."""
  line = (
    f"train step per device, as XLA planned it: {_size(plan['total'])} (state and batch "
    f"{_size(plan['arguments'])}, temporaries {_size(plan['temporaries'])}, outputs not "
    f"donated {_size(plan['outputs'] - plan['donated'])})"
  )
  if device_stats and device_stats.get("bytes_limit"):
    line += f"; the device has {_size(device_stats['bytes_limit'])}"
  return line


def _size(num_bytes: int) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if num_bytes >= scale:
      return f"{num_bytes / scale:.3g} {unit}"
  return f"{num_bytes} B"


def peak_memory(device_stats: dict | None) -> dict[str, float]:
  """{"peak_memory_gb": ...} from a device's memory_stats() (GPUs, TPUs); {} where
  there are none (the CPU)."""
  if not device_stats or "peak_bytes_in_use" not in device_stats:
    return {}
  return {"peak_memory_gb": device_stats["peak_bytes_in_use"] / 1e9}


def log_line(step: int, total: int, metrics: dict[str, float], speed: dict[str, float]) -> None:
  """`speed`: Progress.report's (none on the first step, whose compile is not a rate)
  and peak_memory's."""
  parts = [
    f"step {step}/{total}",
    f"loss={metrics['loss']:.4f}",
    f"lr={metrics['learning_rate']:.3g}",
  ]
  if "examples_per_sec" in speed:
    parts.append(f"examples/s={speed['examples_per_sec']:.0f}")
  if "tokens_per_sec" in speed:
    parts.append(f"tokens/s={speed['tokens_per_sec']:.0f}")
  if "tflops_per_device" in speed:
    parts.append(f"TFLOP/s/device={speed['tflops_per_device']:.3g}")
  if "mfu" in speed:
    parts.append(f"MFU={100 * speed['mfu']:.1f}%")
  if "peak_memory_gb" in speed:
    parts.append(f"peak_memory={speed['peak_memory_gb']:.3g}GB")
  if "eta_sec" in speed:
    parts.append(f"ETA {datetime.timedelta(seconds=int(speed['eta_sec']))}")
  logging.info("%s", " ".join(parts))
