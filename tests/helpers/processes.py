"""Driving a training subprocess from a test."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def sigterm_once_training(process: subprocess.Popen, workdir: Path, timeout_s: float = 180) -> str:
  """Waits for the first metrics line in workdir, sends SIGTERM, returns the process's stderr."""
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240  # start-up: imports, data, compile
  while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
    time.sleep(0.5)
  process.send_signal(signal.SIGTERM)
  return process.communicate(timeout=timeout_s)[1]
