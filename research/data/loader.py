"""Step-indexed batches: the examples of global step s are a pure function of (seed, s).

The training stream is the concatenation of epochs, each a fresh permutation
of the examples drawn from (seed, epoch). Global step s takes positions
[s*B, (s+1)*B) of that stream, so resuming at any step needs no iterator state
and every host computes the same global batch; each process keeps only its
contiguous slice of B/P rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def process_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
  if global_batch_size % process_count:
    raise ValueError(
      f"global batch {global_batch_size} is not divisible by {process_count} processes"
    )
  per_process = global_batch_size // process_count
  return slice(process_index * per_process, (process_index + 1) * per_process)


class StepLoader:
  """Training batches for any step, in any order, on any number of processes."""

  def __init__(
    self,
    arrays: dict[str, np.ndarray],
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    pipeline=None,
  ):
    """`pipeline`: a `preprocess.Pipeline` applied to each batch's inputs (augmentation)."""
    self.arrays = arrays
    self.pipeline = pipeline
    self.num_examples = len(next(iter(arrays.values())))
    self.global_batch_size = global_batch_size
    self.seed = seed
    self._rows = process_slice(global_batch_size, process_index, process_count)
    self._permutations: dict[int, np.ndarray] = {}  # the epochs in use (at most two)

  def epoch_permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._permutations:
      rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
      if len(self._permutations) >= 2:
        self._permutations.pop(min(self._permutations))
      self._permutations[epoch] = rng.permutation(self.num_examples)
    return self._permutations[epoch]

  def global_indices(self, step: int) -> np.ndarray:
    """Example indices of the whole global batch of `step`."""
    positions = np.arange(step * self.global_batch_size, (step + 1) * self.global_batch_size)
    epochs, offsets = np.divmod(positions, self.num_examples)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
      in_epoch = epochs == epoch
      indices[in_epoch] = self.epoch_permutation(int(epoch))[offsets[in_epoch]]
    return indices

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    """This process's slice of the global batch of `step`."""
    indices = self.global_indices(step)[self._rows]
    batch = {key: value[indices] for key, value in self.arrays.items()}
    if self.pipeline is not None:
      from research.data import preprocess

      draws = preprocess.Draws(self.seed, step, self._rows, self.global_batch_size)
      batch["inputs"] = self.pipeline(batch["inputs"], draws)
    return batch


def eval_batches(
  arrays: dict[str, np.ndarray],
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Every example exactly once, in order; the last batch is padded, `mask` marks real rows
  and `index` is each row's position in `arrays` (0 for padding)."""
  num_examples = len(next(iter(arrays.values())))
  rows = process_slice(global_batch_size, process_index, process_count)
  for start in range(0, num_examples, global_batch_size):
    positions = np.arange(start, start + global_batch_size)[rows]
    mask = positions < num_examples
    indices = np.where(mask, positions, 0)
    batch = {key: value[indices] for key, value in arrays.items()}
    batch["mask"] = mask
    batch["index"] = indices.astype(np.int32)
    yield batch
