"""Configs for datasets whose files are not here (CIFAR), run under tfds.testing.mock_data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from research import config as config_lib
from research import train


@pytest.mark.parametrize("dataset, classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_configs_train_and_evaluate_on_mock_data(dataset, classes, tmp_path):
  import tensorflow_datasets as tfds

  spec = f"{config_lib.REPO_ROOT}/experiments/cifar_resnet.py:dataset={dataset},depth=8,steps=4"
  config = config_lib.load_file(spec)
  config.model.width = 4
  config.global_batch_size, config.eval_batch_size = 16, 16
  config.data.raw_dir = ""  # the real builder, its download and files mocked
  with tfds.testing.mock_data(num_examples=32):
    final = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(final["loss"]) and 0.0 <= final["accuracy"] <= 1.0
  derived = json.loads((tmp_path / "config.json").read_text())
  table = (tmp_path / "sharding.md").read_text().splitlines()
  assert any("| stem/kernel | (3, 3, 3, 4) |" in line for line in table)  # RGB in
  assert any(f"| head/kernel | (16, {classes}) |" in line for line in table)  # K classes out
  assert derived["config"]["data"]["name"] == dataset


def test_cifar_config_names_a_bad_dataset():
  with pytest.raises(config_lib.ConfigError, match="dataset='svhn': valid: cifar10, cifar100"):
    config_lib.load_file(f"{config_lib.REPO_ROOT}/experiments/cifar_resnet.py:dataset=svhn")


def test_imagenet_config_streams_from_a_data_source_under_mock_data(tmp_path):
  """ImageNet is read on demand (random access), resized to 256, cropped to 224."""
  import tensorflow_datasets as tfds

  from research import registry

  config = config_lib.load_file(f"{config_lib.REPO_ROOT}/experiments/imagenet2012_resnet50.py")
  config.data.raw_dir = ""
  config.model.update(depth=18, width=4)
  config.global_batch_size, config.eval_batch_size, config.num_train_steps = 4, 6, 2
  config.schedule.warmup_steps = 1
  with tfds.testing.mock_data(num_examples=10):
    dataset = registry.datasets.get("imagenet2012")(config.data)
    assert len(dataset.train["targets"]) == len(dataset.eval["targets"]) == 10
    batch = dataset.train_loader(4, seed=0)(0)
    assert batch["inputs"].shape == (4, 224, 224, 3) and batch["inputs"].dtype == np.float32
    assert batch["targets"].shape == (4,) and (batch["targets"] < 1000).all()
    again = dataset.train_loader(4, seed=0)(0)  # a function of the step
    np.testing.assert_array_equal(batch["inputs"], again["inputs"])
    final = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(final["loss"])
  table = (tmp_path / "sharding.md").read_text()
  assert "| head/kernel | (32, 1000) |" in table  # ResNet-18 layout at width 4: 8x4 features
