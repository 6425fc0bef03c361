"""TFDS preparation from the original files: real MNIST, and clear errors for bad files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from research import config as config_lib
from research.data import sources


def test_mnist_is_prepared_by_tfds_from_the_original_files(mnist):
  assert mnist.train["inputs"].shape == (60000, 28, 28, 1)
  assert mnist.eval["inputs"].shape == (10000, 28, 28, 1)
  assert mnist.train["inputs"].dtype == np.uint8 and mnist.train["targets"].dtype == np.int32
  assert mnist.num_classes == 10
  assert np.bincount(mnist.eval["targets"]).tolist()[:3] == [980, 1135, 1032]  # the real test set


def test_mnist_and_fashion_mnist_prepared_side_by_side_stay_apart(mnist, tfds_data_dir):
  """Both ship files with the same names; TFDS must not mix them up in one data_dir."""
  from research import registry

  data_config = config_lib.base().data
  data_config.raw_dir = config_lib.raw_data_dir("fashion_mnist")
  data_config.data_dir = tfds_data_dir
  fashion = registry.datasets.get("fashion_mnist")(data_config)
  # Fashion-MNIST is balanced: 6,000 train and 1,000 test images per class.
  assert np.bincount(fashion.train["targets"]).tolist() == [6000] * 10
  assert np.bincount(fashion.eval["targets"]).tolist() == [1000] * 10
  assert np.bincount(mnist.train["targets"]).tolist()[:2] == [5923, 6742]
  # And the images are not MNIST's: mean pixel 72.9 (Fashion) vs 33.3 (MNIST) on train.
  assert 70 < fashion.train["inputs"].mean() < 76 and 31 < mnist.train["inputs"].mean() < 35


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


def test_prepared_arrays_are_cached_and_later_loads_skip_tensorflow(mnist, tfds_data_dir):
  probe = (
    "import sys, numpy as np\n"
    "from research.data import sources\n"
    f"b = sources.prepare('mnist', '', {tfds_data_dir!r})\n"
    "a = sources.load_arrays(b, 'test')\n"
    "np.save(sys.argv[1], a['inputs']); print('tensorflow' in sys.modules)\n"
  )
  out = Path(tfds_data_dir) / "probe.npy"
  result = subprocess.run(
    [sys.executable, "-c", probe, str(out)], capture_output=True, text=True,
    cwd=config_lib.REPO_ROOT, timeout=120,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "False"  # no TensorFlow import: read from the cache
  np.testing.assert_array_equal(np.load(out), mnist.eval["inputs"])


PREPARE_AT_ONCE = """
import sys, time
from pathlib import Path
from research import config
from research.data import sources, text
sources._import_tfds()  # TensorFlow imported before the start: both prepare at once
print("ready", flush=True)
while not Path(sys.argv[2]).exists():
  time.sleep(0.01)
builder = sources.prepare("tiny_shakespeare", config.raw_data_dir("tiny_shakespeare"), sys.argv[1])
print(len(text.load_texts(builder, ["train"])["train"]))
"""


def test_a_builder_made_before_another_process_finished_preparing_is_made_again():
  """The race CI met once in the test below: a builder made while another process was
  still preparing, asked after it finished, is prepared but has no splits (TFDS read
  none): prepared_once makes it again rather than return it."""

  class Builder:
    def __init__(self, splits):
      self.info = types.SimpleNamespace(splits=splits)

    def is_prepared(self):
      return True

  made = iter([Builder({}), Builder({"train": 1})])
  builder = sources.prepared_once(lambda: next(made), download_and_prepare=pytest.fail)
  assert builder.info.splits == {"train": 1}


def test_processes_preparing_one_dataset_at_once_take_turns(tmp_path):
  """Two processes prepare one dataset in one fresh data_dir at the same moment (runs of
  a sweep started together): both succeed, one prepared folder is left. Without the lock,
  TFDS's rename of the second finished folder fails (measured: FileExistsError)."""
  data_dir, go = tmp_path / "tfds", tmp_path / "go"
  processes = [
    subprocess.Popen(
      [sys.executable, "-c", PREPARE_AT_ONCE, str(data_dir), str(go)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      cwd=config_lib.REPO_ROOT,
    )  # fmt: skip
    for _ in range(2)
  ]
  for process in processes:
    assert process.stdout.readline().strip() == "ready", process.stderr.read()[-3000:]
  go.touch()
  results = [process.communicate(timeout=300) for process in processes]
  for process, (_, err) in zip(processes, results, strict=True):
    assert process.returncode == 0, err[-3000:]
  lengths = [int(out.split()[-1]) for out, _ in results]  # after TFDS's own lines
  assert lengths[0] == lengths[1] > 1_000_000 * 0.8
  assert [p.name for p in (data_dir / "tiny_shakespeare").iterdir()] == ["1.0.0"]
