"""The step-indexed loader: determinism, resume, process slices, exact-once evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from research.data import loader


def _arrays(n=100):
  return {"inputs": np.arange(n * 4, dtype=np.uint8).reshape(n, 2, 2, 1), "targets": np.arange(n)}


def test_same_seed_same_batches_other_seed_other_batches():
  a = loader.StepLoader(_arrays(), 10, seed=3)
  b = loader.StepLoader(_arrays(), 10, seed=3)
  c = loader.StepLoader(_arrays(), 10, seed=4)
  for step in range(25):
    np.testing.assert_array_equal(a(step)["targets"], b(step)["targets"])
  assert not all(np.array_equal(a(s)["targets"], c(s)["targets"]) for s in range(5))


def test_batch_of_a_step_does_not_depend_on_history():
  """Resuming at step s gives the batch an uninterrupted run saw at s."""
  straight = loader.StepLoader(_arrays(), 16, seed=0)
  seen = [straight(s)["targets"] for s in range(30)]
  resumed = loader.StepLoader(_arrays(), 16, seed=0)
  for s in (29, 7, 18, 0):
    np.testing.assert_array_equal(resumed(s)["targets"], seen[s])


def test_each_epoch_is_a_fresh_permutation_covering_every_example():
  data = loader.StepLoader(_arrays(100), 10, seed=0)
  epoch0 = np.concatenate([data(s)["targets"] for s in range(10)])
  epoch1 = np.concatenate([data(s)["targets"] for s in range(10, 20)])
  assert sorted(epoch0) == list(range(100)) and sorted(epoch1) == list(range(100))
  assert not np.array_equal(epoch0, epoch1)


def test_batches_straddle_epochs_without_dropping_examples():
  data = loader.StepLoader(_arrays(30), 8, seed=1)  # 30 is not a multiple of 8
  stream = np.concatenate([data(s)["targets"] for s in range(15)])  # 120 = 4 epochs
  for epoch in range(4):
    assert sorted(stream[epoch * 30 : (epoch + 1) * 30]) == list(range(30))


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_process_slices_are_disjoint_and_cover_the_global_batch(process_count):
  whole = loader.StepLoader(_arrays(), 16, seed=5)
  for step in range(12):
    parts = [
      loader.StepLoader(_arrays(), 16, seed=5, process_index=p, process_count=process_count)(step)
      for p in range(process_count)
    ]
    assert all(len(p["targets"]) == 16 // process_count for p in parts)
    np.testing.assert_array_equal(
      np.concatenate([p["targets"] for p in parts]), whole(step)["targets"]
    )


def test_indivisible_batch_is_an_error():
  with pytest.raises(ValueError, match="not divisible by 3 processes"):
    loader.StepLoader(_arrays(), 16, seed=0, process_count=3)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_visits_every_example_exactly_once(process_count):
  arrays = _arrays(103)
  labels = []
  for p in range(process_count):
    for batch in loader.eval_batches(arrays, 20, p, process_count):
      assert len(batch["targets"]) == 20 // process_count
      labels.extend(batch["targets"][batch["mask"]])
  assert sorted(labels) == list(range(103))
