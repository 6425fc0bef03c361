"""Preprocessing ops: what each op does, determinism, process-count independence, errors."""

import numpy as np
import pytest

from research import config as config_lib
from research.data import loader, preprocess


def images(batch=6, size=8, channels=1):
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (batch, size, size, channels), dtype=np.uint8)


def draws(step=0, batch=6, rows=None):
  return preprocess.Draws(seed=1, step=step, rows=rows or slice(0, batch), global_batch=batch)


def test_pad_then_crop_gives_shifted_windows_of_the_original():
  x = images()
  out = preprocess.Pipeline("pad(2)|random_crop(8)")(x, draws())
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  assert out.shape == x.shape and out.dtype == np.uint8
  shifts = set()
  for i in range(len(x)):  # every output is some 8x8 window of its own padded image
    found = [
      (t, lft)
      for t in range(5)
      for lft in range(5)
      if (padded[i, t : t + 8, lft : lft + 8] == out[i]).all()
    ]
    assert found, i
    shifts.add(found[0])
  assert len(shifts) > 1  # not one fixed window


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_is_numpys_pad(mode):
  x = images(batch=3, channels=3)
  want = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode=mode)
  out = preprocess.Pipeline(f"pad(2, {mode!r})")(x)
  assert out.dtype == np.uint8 and (out == want).all()


@pytest.mark.parametrize("channels,dtype", [(1, np.uint8), (3, np.uint8), (3, np.float32)])
def test_flip_flips_some_images_and_keeps_the_others(channels, dtype):
  x = images(batch=32, channels=channels).astype(dtype)
  out = preprocess.Pipeline("flip_lr")(x, draws(batch=32))
  assert out.shape == x.shape and out.dtype == x.dtype
  flipped = [(out[i] == x[i, :, ::-1]).all() for i in range(32)]
  kept = [(out[i] == x[i]).all() for i in range(32)]
  assert all(f or k for f, k in zip(flipped, kept, strict=True))
  assert 4 < sum(flipped) < 28 and 4 < sum(kept) < 28


def test_rotate_by_zero_is_identity_and_by_90_degrees_is_rot90():
  x = images()
  assert (preprocess.rotate_scale(x, draws(), 0.0, 0.0) == x).all()

  class Ninety(preprocess.Draws):
    def uniform(self, low, high):
      return np.full(6, high)

  turned = preprocess.rotate_scale(x, Ninety(1, 0, slice(0, 6), 6), 90.0, 0.0)
  assert any((turned == np.rot90(x, k, axes=(1, 2))).all() for k in (1, 3))


def test_normalize_and_value_range():
  x = np.array([0, 51, 255], np.uint8).reshape(1, 1, 3, 1)
  np.testing.assert_allclose(preprocess.Pipeline("value_range(-1, 1)")(x).ravel(), [-1, -0.6, 1])
  np.testing.assert_allclose(
    preprocess.Pipeline("normalize(0.5, 0.25)")(x).ravel(), [-2, -1.2, 2], rtol=1e-6
  )


def test_a_step_augments_the_same_on_any_number_of_processes_and_on_resume():
  arrays = {"inputs": images(batch=20), "targets": np.arange(20, dtype=np.int32)}
  pipeline = preprocess.Pipeline("pad(2)|random_crop(8)|flip_lr|rotate_scale(15, 0.1)")
  one = loader.StepLoader(arrays, 8, seed=3, pipeline=pipeline)
  halves = [
    loader.StepLoader(arrays, 8, seed=3, process_index=i, process_count=2, pipeline=pipeline)
    for i in range(2)
  ]
  for step in (0, 5):
    whole = one(step)["inputs"]
    np.testing.assert_array_equal(whole, np.concatenate([h(step)["inputs"] for h in halves]))
    np.testing.assert_array_equal(whole, one(step)["inputs"])  # a resumed run: same batch
  assert not (one(0)["inputs"] == one(1)["inputs"]).all()


@pytest.mark.parametrize(
  "spec, channels, random",
  [
    ("pad(2)|random_crop(8)|flip_lr", 1, True),
    ("decode|pad(3, 'reflect')|random_crop(7, 5)|central_crop(4)|flip_lr(0.3)", 3, True),
    ("pad(1, 'edge')|central_crop(6)", 3, False),
  ],
)
def test_a_pipelines_device_form_gives_the_hosts_bytes(spec, channels, random):
  import jax

  x = images(batch=16, channels=channels)
  pipeline = preprocess.Pipeline(spec)
  on_device = preprocess.DevicePipeline.of(pipeline, x.shape[1:])
  assert on_device.random == random
  run = jax.jit(on_device.__call__)
  for step in range(4):
    want = pipeline(x, preprocess.Draws(5, step, slice(None), 16))
    got = run(x, on_device.numbers(5, step, 16))
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), want)
  assert preprocess.DevicePipeline.of(preprocess.Pipeline("rotate_scale(10)"), x.shape[1:]) is None


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("pp_train", "pad(2)|flip", "unknown preprocessing op 'flip' (did you mean 'flip_lr'?)"),
    ("pp_train", "pad(2,", "bad preprocessing op"),
    ("pp_eval", "random_crop(24)", "random ops belong in pp_train only"),
  ],
)
def test_bad_pipelines_are_config_errors(key, value, message):
  config = config_lib.base()
  config.data[key] = value
  with pytest.raises(config_lib.ConfigError, match=f"config.data.{key}=") as error:
    config_lib.validate(config)
  assert message in str(error.value)


def test_train_and_eval_pipelines_must_agree_on_shape():
  from research.data import sources

  data = {"inputs": images(), "targets": np.zeros(6, np.int32)}
  dataset = sources.ArrayDataset(train=data, eval=data, num_classes=10)
  config = config_lib.base().data
  config.pp_train = "pad(2)|random_crop(10)"
  with pytest.raises(sources.DataError, match="they must agree"):
    sources.with_preprocessing(dataset, config)
  config.pp_eval = "pad(1)"
  prepared = sources.with_preprocessing(dataset, config)
  assert prepared.eval["inputs"].shape == (6, 10, 10, 1)
  assert prepared.train_loader(4, seed=0)(0)["inputs"].shape == (4, 10, 10, 1)
