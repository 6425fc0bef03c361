"""The mesh from the config, and data parallelism over 8 fake CPU devices."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_collections
import pytest

from research import config as config_lib
from research import parallel
from research.metrics import read_jsonl


def _mesh(data=-1, fsdp=1, model=1):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, model=model))


def test_mesh_shape_fills_the_remaining_devices():
  assert parallel.mesh_shape(_mesh(), 8) == (8, 1, 1)
  assert parallel.mesh_shape(_mesh(data=2, fsdp=-1), 8) == (2, 4, 1)
  assert parallel.mesh_shape(_mesh(data=-1, model=2), 8) == (4, 1, 2)
  with pytest.raises(config_lib.ConfigError, match="at most one axis may be -1"):
    parallel.mesh_shape(_mesh(data=-1, fsdp=-1), 8)
  with pytest.raises(config_lib.ConfigError, match="do not divide 8 devices"):
    parallel.mesh_shape(_mesh(data=-1, model=3), 8)
  with pytest.raises(config_lib.ConfigError, match="product 4 != 8 devices"):
    parallel.mesh_shape(_mesh(data=4), 8)


def test_multi_slice_mesh_puts_data_across_slices():
  """Two fake 4-device slices: each slice's devices share a `data` block (DCN outermost)."""
  import types

  devices = [
    types.SimpleNamespace(id=i, slice_index=i // 4, platform="cpu", device_kind="cpu")
    for i in range(8)
  ]
  grid = parallel.device_grid(_mesh(data=-1, model=2), devices)
  assert grid.shape == (4, 1, 2)
  slice_of_row = [{d.slice_index for d in row.flatten()} for row in grid]
  assert slice_of_row == [{0}, {0}, {1}, {1}]
  with pytest.raises(config_lib.ConfigError, match="multiple of the 2 TPU slices"):
    parallel.device_grid(_mesh(data=1, model=-1), devices)


def _run(workdir, tfds_data_dir, mnist_raw_dir, devices):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  result = subprocess.run(
    [
      sys.executable, "-m", "research.train", "--config=experiments/mnist_mlp.py",
      f"--workdir={workdir}", f"--config.data.data_dir={tfds_data_dir}",
      f"--config.data.raw_dir={mnist_raw_dir}", "--config.model.widths=(32,)",
      "--config.model.dropout=0.0", "--config.num_train_steps=30",
      "--config.log_every_steps=10", "--config.eval_batch_size=1000",
    ],
    capture_output=True, text=True, cwd=config_lib.REPO_ROOT, env=env, timeout=600,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  return read_jsonl(workdir / "metrics.jsonl")


def test_data_parallel_on_8_devices_matches_one_device(
  mnist, tfds_data_dir, mnist_raw_dir, tmp_path
):
  del mnist  # prepared by the session fixture
  one = _run(tmp_path / "one", tfds_data_dir, mnist_raw_dir, devices=1)
  eight = _run(tmp_path / "eight", tfds_data_dir, mnist_raw_dir, devices=8)
  config_eight = (tmp_path / "eight" / "config.json").read_text()
  assert '"data": 8' in config_eight
  losses = lambda records: [r["metrics"]["loss"] for r in records if r["split"] == "train"]
  assert len(losses(one)) == 3
  assert losses(eight) == pytest.approx(losses(one), rel=1e-5)
  accuracy = lambda records: [r["metrics"]["accuracy"] for r in records if r["split"] == "test"]
  assert accuracy(eight) == pytest.approx(accuracy(one), abs=2e-4)  # at most 2 of 10,000 flip
