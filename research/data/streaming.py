"""Image datasets too large for memory (ImageNet): read on demand from TFDS data sources.

The split is a `tfds.data_source` (ArrayRecord files, random access), so the
step-indexed loader works unchanged: the global batch of step s is the same
example indices as for an in-memory dataset, and only this process's rows are
read and decoded. Each image is decoded, its shorter side resized to
`decode_size` and centre-cropped to a square, giving uint8 batches for the
preprocessing ops (e.g. `random_crop(224)|flip_lr|normalize(...)` in training,
`central_crop(224)|normalize(...)` in evaluation, as the ResNet papers'
"resize 256, crop 224" protocol).

Columns (`LazyColumn`) look like arrays to the loaders: `len`, `ndim` and
indexing by an index array or slice; the two columns of a split share a
one-batch cache, so a batch is read once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses

import numpy as np

from research import registry
from research.data import sources


def resize_and_crop(image_HxWxC: np.ndarray, size: int) -> np.ndarray:
  """Shorter side to `size` (bilinear, antialiased), then the central size x size."""
  import tensorflow as tf

  height, width = image_HxWxC.shape[:2]
  scale = size / min(height, width)
  new_hw = (max(size, round(height * scale)), max(size, round(width * scale)))
  resized = tf.image.resize(image_HxWxC, new_hw, antialias=True).numpy()
  top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
  cropped = resized[top : top + size, left : left + size]
  return np.clip(np.round(cropped), 0, 255).astype(np.uint8)


class SplitReader:
  """Reads and decodes examples of one split by index; remembers the last batch."""

  def __init__(self, source, decode_size: int, pipeline=None, threads: int = 8):
    self.source, self.decode_size, self.pipeline = source, decode_size, pipeline
    self._pool = concurrent.futures.ThreadPoolExecutor(threads)  # TF ops release the GIL
    self._last: tuple[bytes, dict] | None = None

  def __len__(self) -> int:
    return len(self.source)

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    key = np.asarray(indices, np.int64).tobytes()
    if self._last is None or self._last[0] != key:
      examples = self._pool.map(self._example, [int(i) for i in indices])
      images, labels = zip(*examples, strict=True) if len(indices) else ((), ())
      batch = {
        "inputs": np.stack(images) if images else np.zeros((0,) + self.shape[1:], np.uint8),
        "targets": np.asarray(labels, np.int32),
      }
      if self.pipeline is not None:  # deterministic ops (evaluation)
        batch["inputs"] = self.pipeline(batch["inputs"])
      self._last = (key, batch)
    return self._last[1]

  def _example(self, index: int):
    example = self.source[index]
    image = example["image"]
    if image.ndim == 2:
      image = image[:, :, None]
    return resize_and_crop(image, self.decode_size), example["label"]

  @property
  def shape(self) -> tuple[int, ...]:
    return (len(self), self.decode_size, self.decode_size, 3)


@dataclasses.dataclass(frozen=True)
class LazyColumn:
  """One column ("inputs" or "targets") of a split, read on indexing."""

  reader: SplitReader
  key: str

  def __len__(self) -> int:
    return len(self.reader)

  @property
  def ndim(self) -> int:
    return 1 if self.key == "targets" else 4

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, slice):
      index = np.arange(*index.indices(len(self)))
    return self.reader.read(np.asarray(index))[self.key]


def columns(reader: SplitReader) -> dict[str, LazyColumn]:
  return {"inputs": LazyColumn(reader, "inputs"), "targets": LazyColumn(reader, "targets")}


def _streaming_image_classification(tfds_name: str, decode_size: int):
  def load(data_config) -> sources.ArrayDataset:
    from research.data import preprocess

    builder = sources.prepare(tfds_name, data_config.raw_dir, data_config.data_dir, "array_record")
    for split in (data_config.train_split, data_config.eval_split):
      sources.check_split(builder, split)
    sources._import_tfds()
    train = SplitReader(builder.as_data_source(split=data_config.train_split), decode_size)
    pp_eval = preprocess.Pipeline(data_config.pp_eval)
    evaluated = SplitReader(
      builder.as_data_source(split=data_config.eval_split), decode_size, pp_eval
    )
    dataset = sources.ArrayDataset(
      train=columns(train),
      eval=columns(evaluated),
      num_classes=builder.info.features["label"].num_classes,
      pp_train=data_config.pp_train,
    )
    sources.check_preprocessing(dataset, data_config)
    return dataset

  load.__doc__ = (
    f"TFDS {tfds_name!r} read on demand: decoded, shorter side {decode_size}, centre "
    f"{decode_size}x{decode_size}; then config.data.pp_train / pp_eval."
  )
  return load


registry.datasets.register("imagenet2012")(_streaming_image_classification("imagenet2012", 256))
