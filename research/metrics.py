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
      from tensorboardX import SummaryWriter  # lazy: only the writing process needs it

      self._jsonl = open(Path(workdir) / "metrics.jsonl", "a")
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


def read_jsonl(path: str | Path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """Throughput and ETA over the steps since the last report."""

  def __init__(self, first_step: int, total_steps: int, examples_per_step: int):
    self.total_steps = total_steps
    self.examples_per_step = examples_per_step
    self._last_step, self._last_time = first_step, time.perf_counter()

  def report(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta = (self.total_steps - step) / max(steps_per_sec, 1e-9)
    return {
      "steps_per_sec": steps_per_sec,
      "examples_per_sec": steps_per_sec * self.examples_per_step,
      "eta_sec": eta,
    }


def log_line(step: int, total: int, metrics: dict[str, float], speed: dict[str, float]) -> None:
  eta = datetime.timedelta(seconds=int(speed["eta_sec"]))
  logging.info(
    "step %d/%d loss=%.4f lr=%.3g examples/s=%.0f ETA %s",
    step,
    total,
    metrics["loss"],
    metrics["learning_rate"],
    speed["examples_per_sec"],
    eta,
  )
