"""The mesh from the config, and data parallelism over 8 fake CPU devices."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import ml_collections
import pytest
from helpers.xla import devices_flags

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


def _run(workdir, tfds_data_dir, mnist_raw_dir, devices, *flags):
  env = dict(os.environ, XLA_FLAGS=devices_flags(devices))
  result = subprocess.run(
    [
      sys.executable, "-m", "research.train", "--config=experiments/mnist_mlp.py",
      f"--workdir={workdir}", f"--config.data.data_dir={tfds_data_dir}",
      f"--config.data.raw_dir={mnist_raw_dir}", "--config.model.widths=(32,)",
      "--config.model.dropout=0.0", "--config.num_train_steps=30",
      "--config.log_every_steps=10", "--config.eval_batch_size=1000", *flags,
    ],
    capture_output=True, text=True, cwd=config_lib.REPO_ROOT, env=env, timeout=600,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  return read_jsonl(workdir / "metrics.jsonl")


def test_data_parallel_on_8_devices_matches_one_device(
  mnist, tfds_data_dir, mnist_raw_dir, tmp_path
):
  """One device fed from the host, eight gathering batches from MNIST held on each,
  with crops and flips drawn per step: numpy's on the host, jax.numpy's on the devices."""
  del mnist  # prepared by the session fixture
  host = "--config.data.device_resident_mb=0"
  augment = "--config.data.pp_train=pad(2)|random_crop(28)|flip_lr"
  one = _run(tmp_path / "one", tfds_data_dir, mnist_raw_dir, 1, host, augment)
  eight = _run(tmp_path / "eight", tfds_data_dir, mnist_raw_dir, 8, augment)  # held there
  config_eight = (tmp_path / "eight" / "config.json").read_text()
  assert '"data": 8' in config_eight
  losses = lambda records: [r["metrics"]["loss"] for r in records if r["split"] == "train"]
  assert len(losses(one)) == 3
  assert losses(eight) == pytest.approx(losses(one), rel=1e-5)
  accuracy = lambda records: [r["metrics"]["accuracy"] for r in records if r["split"] == "test"]
  assert accuracy(eight) == pytest.approx(accuracy(one), abs=2e-4)  # at most 2 of 10,000 flip


def test_batch_feeder_gathers_the_loaders_batches_on_the_device():
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from research.data import loader, preprocess

  rng = np.random.default_rng(0)
  arrays = {
    "inputs": rng.integers(0, 256, (50, 4, 4, 1), dtype=np.uint8),
    "targets": rng.integers(0, 10, 50).astype(np.int32),
  }
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "model"))
  sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  plain = loader.StepLoader(arrays, 16, seed=3)
  feeder = parallel.BatchFeeder(plain, sharding, device_resident_mb=1)
  assert feeder.device_resident
  for step in (0, 2, 3, 7):  # step 3 spans the end of the first epoch
    got, want = feeder.batch(step), plain(step)
    assert got["inputs"].sharding == sharding
    for key in arrays:
      np.testing.assert_array_equal(np.asarray(got[key]), want[key])
  # Nothing is sent per step within an epoch: the wrapped step gathers its batch
  # by `state.step`, with indices computed as the loader computes them.
  assert feeder(0)[1] is feeder(1)[1] and feeder(0)[0] is feeder.arrays
  State = collections.namedtuple("State", "step")
  step_fn = lambda state, batch: (State(state.step + 1), batch["targets"])  # noqa: E731
  wrapped = jax.jit(feeder.wrap(step_fn), in_shardings=(None, *feeder.shardings))
  state = State(np.int32(0))
  for step in range(12):  # several epochs of 50 examples in batches of 16
    state, targets = wrapped(state, *feeder(step))
    np.testing.assert_array_equal(np.asarray(targets), plain(step)["targets"])
  big = loader.StepLoader(arrays, 40_000_000, seed=3)  # positions overflow int32: host-fed
  assert not parallel.BatchFeeder(big, sharding, 1).device_resident
  # A pp_train of ops with a device form runs in the step on the batch it gathered,
  # with the numbers the host drew for that step: the loader's bytes.
  pipeline = preprocess.Pipeline("pad(1)|random_crop(4)|flip_lr")
  augmented = loader.StepLoader(arrays, 16, 3, pipeline=pipeline)
  feeder = parallel.BatchFeeder(augmented, sharding, device_resident_mb=1)
  assert feeder.device_resident and feeder.numbers_per_step and len(feeder.shardings) == 3
  inputs_fn = lambda state, batch: (State(state.step + 1), batch["inputs"])  # noqa: E731
  wrapped = jax.jit(feeder.wrap(inputs_fn), in_shardings=(None, *feeder.shardings))
  state = State(np.int32(0))
  for step in range(8):
    state, inputs = wrapped(state, *feeder(step))
    np.testing.assert_array_equal(np.asarray(inputs), augmented(step)["inputs"])
    np.testing.assert_array_equal(np.asarray(feeder.batch(step)["inputs"]), inputs)
  assert not (np.asarray(feeder.batch(0)["inputs"]) == plain(0)["inputs"]).all()
  # Host-fed: a host-only op, too large a dataset, or turned off.
  rotated = loader.StepLoader(
    arrays, 16, 3, pipeline=preprocess.Pipeline("flip_lr|rotate_scale(9)")
  )
  assert not parallel.BatchFeeder(rotated, sharding, 1).device_resident
  assert not parallel.BatchFeeder(plain, sharding, 0).device_resident
  assert not parallel.BatchFeeder(plain, sharding, 1e-4).device_resident  # 1 kB > 105 B
  host = parallel.BatchFeeder(plain, sharding, 0)
  assert host.wrap(step_fn) is step_fn and host.shardings == (sharding,)
  np.testing.assert_array_equal(host(3)[0]["inputs"], plain(3)["inputs"])  # numpy to jit
  np.testing.assert_array_equal(np.asarray(host.batch(3)["inputs"]), plain(3)["inputs"])
