"""The metric writers: TensorBoard event files without loading PyTorch."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

from research import config as config_lib

WRITE_SCALARS = """
import sys
from research import metrics
writer = metrics.MetricWriter(sys.argv[1])
loaded_with_tensorboard = "torch" in sys.modules
writer.write(7, "train", {"loss": 0.25})
writer.close()
import torch  # importable afterwards: the writer hid it only while tensorboardX loaded
print(loaded_with_tensorboard, torch.FAKE)
"""


def _events(directory) -> list:
  """The Event records of the TensorBoard event files under `directory` (TFRecord framing:
  length, its CRC, the serialised Event, its CRC)."""
  from tensorboardX.proto import event_pb2

  events = []
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    while data:
      (length,) = struct.unpack("<Q", data[:8])
      events.append(event_pb2.Event.FromString(data[12 : 12 + length]))
      data = data[12 + length + 4 :]
  return events


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
  """tensorboardX imports torch whenever it is installed (1.0 s and 190 MB at every
  start); a stand-in `torch` package on the path shows whether the writer loads it."""
  fake = tmp_path / "site" / "torch"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("FAKE = 'stand-in'\nTensor = object\n")
  env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{config_lib.REPO_ROOT}")
  workdir = tmp_path / "run"
  workdir.mkdir()
  done = subprocess.run(
    [sys.executable, "-c", WRITE_SCALARS, str(workdir)],
    capture_output=True, text=True, env=env, timeout=120,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.split() == ["False", "stand-in"]
  scalars = [
    (e.step, v.tag, v.simple_value)
    for e in _events(workdir / "tensorboard")
    for v in e.summary.value
  ]
  assert scalars == [(7, "train/loss", 0.25)]
