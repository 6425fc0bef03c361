"""Datasets prepared by TFDS's own builders, offline from the original files.

Offline, `config.data.raw_dir` points at the files the dataset's hosts serve
(e.g. `../shared/data/mnist`); they are checked against the sha256 that TFDS
registers for the dataset and handed to the builder as its `manual_dir`, so
TFDS prepares exactly as it would after a download. With `raw_dir = ""` the
same builder downloads. TensorFlow and TFDS are imported only here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import urllib.parse
from pathlib import Path

import numpy as np

from research import registry
from research.data import loader


class DataError(ValueError):
  """Missing or damaged data: the message is one line naming the file."""


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
  """A dataset small enough to hold in memory: splits of {"inputs", "targets"} arrays."""

  train: dict[str, np.ndarray]
  eval: dict[str, np.ndarray]  # preprocessed already (deterministic ops only)
  num_classes: int
  pp_train: str = ""  # applied per training batch: augmentation draws from (seed, step)

  @property
  def num_train_examples(self) -> int:
    return len(self.train["targets"])

  @property
  def model_kwargs(self) -> dict:
    """What the model must know about the data."""
    return {"num_classes": self.num_classes}

  def train_loader(self, global_batch_size, seed, process_index=0, process_count=1):
    from research.data import preprocess

    pipeline = preprocess.Pipeline(self.pp_train) if self.pp_train else None
    return loader.StepLoader(
      self.train, global_batch_size, seed, process_index, process_count, pipeline
    )


def _import_tfds(with_tensorflow: bool = True):
  """TFDS; with TensorFlow too (3-6 s to import) only where TFDS will read or write data."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow_datasets as tfds

  if with_tensorflow:
    import tensorflow as tf

    # TensorFlow only decodes data here: keep it off the accelerators JAX uses.
    tf.config.set_visible_devices([], "GPU")
  tfds.disable_progress_bar()
  return tfds


def sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def verify_raw_files(builder, raw_dir: str) -> None:
  """Checks that every file the builder downloads is in raw_dir with its registered sha256."""
  for url, info in sorted(builder.url_infos.items()):
    verify_raw_file(Path(raw_dir) / info.filename, info.checksum, builder.name, url)


def verify_raw_file(path: Path, expected: str, dataset: str, url: str = "") -> None:
  """A DataError naming `path` unless it exists with sha256 `expected`."""
  if not path.is_file():
    origin = f", from {url}" if url else ""
    raise DataError(f"missing raw file {path} for {dataset} (expected sha256 {expected}{origin})")
  actual = sha256(path)
  if actual != expected:
    raise DataError(
      f"checksum mismatch for {path}: got sha256 {actual}, expected sha256 {expected}"
    )


def prepare(tfds_name: str, raw_dir: str = "", data_dir: str = "", file_format=None):
  """Returns the TFDS builder for `tfds_name`, prepared (from raw_dir when given).

  `file_format="array_record"` for datasets read by random access (tfds.data_source).
  """
  tfds = _import_tfds(with_tensorflow=False)
  kwargs = {"file_format": file_format} if file_format else {}

  def download_and_prepare(builder):
    _import_tfds()
    if raw_dir:
      verify_raw_files(builder, raw_dir)
      download_config = tfds.download.DownloadConfig(manual_dir=raw_dir)
    else:
      download_config = tfds.download.DownloadConfig()
    # TFDS names the files it extracts from manual_dir after the file alone, in a
    # `downloads/extracted` folder shared by all datasets: MNIST's and
    # Fashion-MNIST's identically named files would overwrite each other. A
    # download folder per dataset keeps them apart.
    name = builder.info.full_name.replace("/", "_")
    download_dir = data_root(builder) / "downloads" / name
    builder.download_and_prepare(download_dir=download_dir, download_config=download_config)

  make = lambda: tfds.builder(tfds_name, data_dir=data_dir or None, **kwargs)  # noqa: E731
  return prepared_once(make, download_and_prepare)


def prepared_once(make, download_and_prepare, before=None):
  """`make()`'s builder, its dataset prepared by `download_and_prepare(builder)` in one
  process at a time (see preparing); `before(builder)` runs first where it is not yet
  prepared (checks of the raw files). The builder returned has read the prepared
  folder: TFDS reads a dataset's splits when a builder is made, so one made before
  another process finished preparing has none and is made again."""
  builder = make()
  if builder.is_prepared():
    return builder if builder.info.splits else make()
  if before is not None:
    before(builder)
  with preparing(builder):
    if builder.is_prepared():  # by another process while this one waited
      return make()
    download_and_prepare(builder)
  return builder


def data_root(builder) -> Path:
  """The TFDS data_dir a builder's dataset folder (name[/config]/version) sits in."""
  root = Path(builder.data_dir)
  for _ in builder.info.full_name.split("/"):
    root = root.parent
  return root


@contextlib.contextmanager
def preparing(builder):
  """Holds an exclusive lock on data_dir/.NAME.lock while the dataset is prepared:
  processes preparing it at once in one fresh data_dir (runs of a sweep started
  together, test workers) take turns, and the later ones find it prepared, where
  TFDS's rename of its finished folder would fail in all but the first. Local folders
  only (flock); a cloud data_dir is prepared unlocked."""
  if "://" in str(builder.data_dir):
    yield
    return
  import fcntl

  root = data_root(builder)
  root.mkdir(parents=True, exist_ok=True)
  with open(root / f".{builder.info.full_name.replace('/', '_')}.lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    yield


def check_split(builder, split: str) -> None:
  splits = builder.info.splits
  if not splits:  # split sizes unknown (tfds.testing.mock_data): TFDS itself decides
    return
  if split.split("[")[0] not in splits:  # TFDS slices such as test[:1000] are fine
    raise DataError(
      f"unknown split {split!r} for {builder.name}; valid: {', '.join(sorted(builder.info.splits))}"
    )


def load_arrays(builder, split: str) -> dict[str, np.ndarray]:
  """{"inputs": uint8 images, "targets": int32 labels} of a prepared split.

  The first load also writes the arrays beside the prepared data (a TFDS
  dataset directory never changes once prepared), so later runs skip importing
  TensorFlow and decoding the images: ~10 s less start-up for MNIST.
  """
  check_split(builder, split)
  cache = cache_path(builder, split, ".npz")
  if cache.is_file():
    with np.load(cache) as saved:
      return {"inputs": saved["inputs"], "targets": saved["targets"]}
  tfds = _import_tfds()
  # Batches of 4096, concatenated (batch_size=-1 needs the split's size from
  # the dataset info, which a builder under tfds.testing.mock_data lacks).
  batches = list(tfds.as_numpy(builder.as_dataset(split=split, batch_size=4096)))
  arrays = {
    "inputs": np.concatenate([b["image"] for b in batches]),
    "targets": np.concatenate([b["label"] for b in batches]).astype(np.int32),
  }
  write_atomically(cache, lambda path: np.savez(path, **arrays))
  return arrays


def cache_path(builder, split: str, suffix: str) -> Path:
  """Where a split's decoded contents are cached, beside TFDS's prepared data."""
  return (
    Path(builder.data_dir) / "research_arrays" / f"{urllib.parse.quote(split, safe='')}{suffix}"
  )


def write_atomically(path: Path, write) -> None:
  """write(temporary path), then rename: readers see the whole file or none. A cache
  that cannot be written (a read-only data_dir) is skipped with a warning."""
  partial = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
  try:
    path.parent.mkdir(exist_ok=True)
    write(partial)
    os.replace(partial, path)
  except OSError as e:
    from absl import logging

    logging.warning("not caching %s (%s)", path, e)


def with_preprocessing(dataset: ArrayDataset, data_config) -> ArrayDataset:
  """The eval split through pp_eval (once), and pp_train attached to the training loader."""
  from research.data import preprocess

  pp_eval = preprocess.Pipeline(data_config.pp_eval)
  eval_arrays = {**dataset.eval, "inputs": pp_eval(dataset.eval["inputs"])}
  dataset = dataclasses.replace(dataset, eval=eval_arrays, pp_train=data_config.pp_train)
  check_preprocessing(dataset, data_config)
  return dataset


def check_preprocessing(dataset: ArrayDataset, data_config) -> None:
  """Training and evaluation must give the model the same image shape and dtype."""
  from research.data import preprocess

  draws = preprocess.Draws(0, 0, slice(0, 2), 2)
  trained_on = preprocess.Pipeline(data_config.pp_train)(dataset.train["inputs"][:2], draws)
  evaluated_on = dataset.eval["inputs"][:2]
  if trained_on.shape[1:] != evaluated_on.shape[1:] or trained_on.dtype != evaluated_on.dtype:
    raise DataError(
      f"config.data.pp_train={data_config.pp_train!r} gives images of shape "
      f"{trained_on.shape[1:]} {trained_on.dtype}, config.data.pp_eval={data_config.pp_eval!r} "
      f"gives {evaluated_on.shape[1:]} {evaluated_on.dtype}; they must agree"
    )


def _image_classification(tfds_name: str):
  def load(data_config) -> ArrayDataset:
    builder = prepare(tfds_name, data_config.raw_dir, data_config.data_dir)
    return with_preprocessing(
      ArrayDataset(
        train=load_arrays(builder, data_config.train_split),
        eval=load_arrays(builder, data_config.eval_split),
        num_classes=builder.info.features["label"].num_classes,
      ),
      data_config,
    )

  load.__doc__ = f"TFDS {tfds_name!r}, held in memory as uint8 NHWC images and int32 labels."
  return load


# CIFAR: the same path; their files are not on this project's machines, so they
# download (raw_dir "") or run under tfds.testing.mock_data in the tests.
for _name in ("mnist", "fashion_mnist", "cifar10", "cifar100"):
  registry.datasets.register(_name)(_image_classification(_name))
