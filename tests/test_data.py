"""TFDS preparation from the original files: real MNIST, and clear errors for bad files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from research.data import sources


def test_mnist_is_prepared_by_tfds_from_the_original_files(mnist):
  assert mnist.train["image"].shape == (60000, 28, 28, 1)
  assert mnist.eval["image"].shape == (10000, 28, 28, 1)
  assert mnist.train["image"].dtype == np.uint8 and mnist.train["label"].dtype == np.int32
  assert mnist.num_classes == 10
  assert np.bincount(mnist.eval["label"]).tolist()[:3] == [980, 1135, 1032]  # the real test set


def _raw_copy(mnist_raw_dir, tmp_path):
  raw = tmp_path / "raw"
  raw.mkdir()
  for path in sorted(__import__("pathlib").Path(mnist_raw_dir).iterdir()):
    (raw / path.name).symlink_to(path)
  return raw


def test_missing_raw_file_names_it_and_its_sha256(mnist_raw_dir, tmp_path):
  raw = _raw_copy(mnist_raw_dir, tmp_path)
  (raw / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(sources.DataError) as error:
    sources.prepare("mnist", str(raw), str(tmp_path / "tfds"))
  message = str(error.value)
  assert "missing raw file" in message and "t10k-labels-idx1-ubyte.gz" in message
  assert "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6" in message
  assert not (tmp_path / "tfds" / "mnist").exists() or not any(
    (tmp_path / "tfds" / "mnist").rglob("*.tfrecord*")
  )


def test_damaged_raw_file_is_a_checksum_mismatch(mnist_raw_dir, tmp_path):
  raw = _raw_copy(mnist_raw_dir, tmp_path)
  damaged = raw / "t10k-labels-idx1-ubyte.gz"
  damaged.unlink()
  shutil.copy(f"{mnist_raw_dir}/t10k-labels-idx1-ubyte.gz", damaged)
  with open(damaged, "r+b") as f:
    f.seek(100)
    f.write(b"\x00\x01\x02")
  with pytest.raises(
    sources.DataError,
    match="checksum mismatch for .*t10k-labels-idx1-ubyte.gz.*expected sha256 f7ae60f92e00ec6d",
  ):
    sources.prepare("mnist", str(raw), str(tmp_path / "tfds"))
