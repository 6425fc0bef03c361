"""scikit-learn's digits: 1,797 real 8x8 handwritten digits (UCI optdigits, 0-16 ink
levels), shipped inside scikit-learn, so they need no download.

For transfer from MNIST they are put in MNIST's framing: ink scaled to 0-255,
upsampled bilinearly to 20x20 and centred in 28x28 (MNIST's digits fill a 20x20
box). Splits: a stratified 1,000 `train` / 797 `test` with a fixed seed.
"""

from __future__ import annotations

import numpy as np

from research import registry
from research.data import sources

NUM_TRAIN = 1000


def mnist_framed(images_Nx8x8: np.ndarray) -> np.ndarray:
  """0-16 8x8 -> uint8 28x28x1: bilinear 20x20, zero border of 4."""
  from scipy import ndimage

  scaled = images_Nx8x8.astype(np.float64) * (255.0 / 16.0)
  big_Nx20x20 = ndimage.zoom(scaled, (1, 2.5, 2.5), order=1, grid_mode=True, mode="nearest")
  framed = np.pad(big_Nx20x20, ((0, 0), (4, 4), (4, 4)))
  return np.clip(np.round(framed), 0, 255).astype(np.uint8)[..., None]


@registry.datasets.register("digits")
def digits(data_config) -> sources.ArrayDataset:
  """scikit-learn's digits in MNIST's framing (see the module docstring)."""
  from sklearn import datasets, model_selection

  bunch = datasets.load_digits()
  images, labels = mnist_framed(bunch.images), bunch.target.astype(np.int32)
  train_idx, test_idx = model_selection.train_test_split(
    np.arange(len(labels)), train_size=NUM_TRAIN, stratify=labels, random_state=0
  )
  splits = {
    "train": {"inputs": images[train_idx], "targets": labels[train_idx]},
    "test": {"inputs": images[test_idx], "targets": labels[test_idx]},
  }
  for key in ("train_split", "eval_split"):
    if data_config[key] not in splits:
      raise sources.DataError(
        f"config.data.{key}={data_config[key]!r}: digits has splits {', '.join(splits)}"
      )
  dataset = sources.ArrayDataset(
    train=splits[data_config.train_split], eval=splits[data_config.eval_split], num_classes=10
  )
  return sources.with_preprocessing(dataset, data_config)
