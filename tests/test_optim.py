"""Optimizer and schedule factories, weight-decay masks, clipping, penalties."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.xla import devices_flags

from research import config as config_lib
from research import experiment, losses, optim, registry


def _params():
  return {
    "dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))},
    "layer_norm": {"scale": jnp.ones((2, 2))},
  }


@pytest.mark.parametrize("name", registry.optimizers.names())
def test_every_optimizer_minimises_a_quadratic(name):
  tx, _ = optim.make_optimizer(
    config_lib.entry("optimizer", name, learning_rate=0.1),
    config_lib.entry("schedule", "constant"),
    total_steps=100,
  )
  params = {"w": jnp.array([3.0, -2.0])}
  state = tx.init(params)
  loss = lambda p: jnp.sum(jnp.square(p["w"]))
  for _ in range(100):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert loss(params) < 0.05 * 13.0


def test_schedules():
  make = lambda name, **kw: optim.make_schedule(config_lib.entry("schedule", name, **kw), 1.0, 100)
  assert make("constant")(57) == 1.0
  cosine = make("cosine", alpha=0.1)
  assert cosine(0) == pytest.approx(1.0) and cosine(100) == pytest.approx(0.1)
  warm = make("warmup_cosine", warmup_steps=10)
  assert warm(0) == 0.0 and warm(5) == pytest.approx(0.5) and warm(10) == pytest.approx(1.0)
  assert warm(100) == pytest.approx(0.0, abs=1e-6)
  piece = make("piecewise", boundaries=(30, 60), scales=(0.1, 0.5))
  assert [float(piece(s)) for s in (0, 29, 30, 60, 99)] == pytest.approx([1, 1, 0.1, 0.05, 0.05])
  cycle = make("one_cycle", pct_start=0.3)
  assert cycle(0) == pytest.approx(1.0 / 25) and cycle(30) == pytest.approx(1.0)
  assert cycle(100) < 1e-4
  with pytest.raises(config_lib.ConfigError, match="same length"):
    make("piecewise", boundaries=(1,), scales=())
  # A config error (one line and exit 2 from the trainer), not a traceback.
  with pytest.raises(config_lib.ConfigError, match=r"warmup_steps=100 must be < total steps 100"):
    make("warmup_cosine", warmup_steps=100)
  rsqrt = make("warmup_rsqrt", warmup_steps=10, timescale=10, cooldown_steps=20)
  steps = (0, 5, 10, 20, 80, 90, 100)
  want = [0, 0.5, 1, 2**-0.5, 8**-0.5, 9**-0.5 / 2, 0]  # 1 / sqrt(1 + (step - 10) / 10)
  assert [float(rsqrt(s)) for s in steps] == pytest.approx(want, abs=1e-6)
  wsd = make("warmup_stable_decay", warmup_steps=10, decay_fraction=0.2, end_value=0.1)
  steps = (0, 5, 10, 50, 80, 90, 100)
  assert [float(wsd(s)) for s in steps] == pytest.approx([0, 0.5, 1, 1, 1, 0.55, 0.1])
  sqrt_decay = make("warmup_stable_decay", decay_fraction=0.2, decay_shape="1-sqrt")
  assert float(sqrt_decay(90)) == pytest.approx(1 - 0.5**0.5)
  with pytest.raises(config_lib.ConfigError, match=r"decay_shape='cosine' \(valid: linear, 1-sqrt"):
    make("warmup_stable_decay", decay_shape="cosine")
  with pytest.raises(config_lib.ConfigError, match=r"cooldown_steps=95 must be <= total steps"):
    make("warmup_rsqrt", warmup_steps=10, cooldown_steps=95)


def test_decay_mask_skips_biases_and_norms():
  mask = optim.decay_mask(_params())
  assert mask == {"dense": {"kernel": True, "bias": False}, "layer_norm": {"scale": False}}


@pytest.mark.parametrize("name", ["adamw", "sgd", "momentum", "adam", "lion", "adafactor"])
def test_weight_decay_only_touches_masked_weights(name):
  tx, _ = optim.make_optimizer(
    config_lib.entry("optimizer", name, learning_rate=0.1, weight_decay=0.5),
    config_lib.entry("schedule", "constant"),
    total_steps=10,
  )
  params = _params()
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  assert float(jnp.abs(updates["dense"]["kernel"]).sum()) > 0
  assert float(jnp.abs(updates["dense"]["bias"]).sum()) == 0
  assert float(jnp.abs(updates["layer_norm"]["scale"]).sum()) == 0


def test_global_norm_clipping():
  tx, _ = optim.make_optimizer(
    config_lib.entry("optimizer", "sgd", learning_rate=1.0, grad_clip_norm=1.0),
    config_lib.entry("schedule", "constant"),
    total_steps=10,
  )
  grads = {"w": jnp.array([30.0, 40.0])}
  updates, _ = tx.update(grads, tx.init(grads), grads)
  np.testing.assert_allclose(updates["w"], [-0.6, -0.8], rtol=1e-6)


@pytest.mark.parametrize("flags", ["", "--xla_cpu_experimental_ynn_fusion_type=dot"])
def test_gradient_norm_and_its_clipping_are_optaxs(flags, monkeypatch):
  """optim.global_norm (in each form: for YNNPACK's reductions, and by rows for XLA's,
  as under the LM's flags) is optax.global_norm, and NaN or Inf for any non-finite
  gradient (the train step's finiteness check reads it); the clipping built on it is
  optax.clip_by_global_norm, below and above the bound."""
  monkeypatch.setenv("XLA_FLAGS", flags)  # read when the norm is traced
  tree = {
    "kernel": jax.random.normal(jax.random.key(0), (3, 4, 5)),
    "bias": jnp.arange(4.0),
    "scalar": jnp.float32(-2.0),
    "big": jax.random.normal(jax.random.key(1), (96, 64)),  # summed by rows under "dot"
  }
  np.testing.assert_allclose(optim.global_norm(tree), optax.global_norm(tree), rtol=1e-6)
  assert float(optim.global_norm({})) == 0.0
  for bad in (jnp.inf, -jnp.inf, jnp.nan, 3e20):  # 3e20 squared overflows float32
    for leaf, at in (("bias", 1), ("big", 4000)):
      flat = tree[leaf].ravel().at[at].set(bad).reshape(tree[leaf].shape)
      assert not np.isfinite(float(optim.global_norm({**tree, leaf: flat}))), (leaf, bad)
  for max_norm in (0.5, 100.0):
    ours, theirs = optim.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    assert jax.tree.structure(ours.init(tree)) == jax.tree.structure(theirs.init(tree))
    got, want = ours.update(tree, ours.init(tree))[0], theirs.update(tree, theirs.init(tree))[0]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6)


def test_sum_of_squares_by_rows_is_the_dot_and_keeps_non_finite():
  """Both forms of a leaf's sum of squares directly (global_norm takes the rows on one
  device only, so its test above may run the dot form under either flag)."""
  x = jax.random.normal(jax.random.key(2), (96, 64))
  for by_rows in (True, False):
    np.testing.assert_allclose(optim._sum_of_squares(x, by_rows), jnp.sum(x * x), rtol=1e-6)
    for bad in (jnp.inf, jnp.nan, 3e20):
      assert not np.isfinite(float(optim._sum_of_squares(x.at[50, 7].set(bad), by_rows)))
  odd = jnp.ones((7, 93))  # not a multiple of 8 rows: the dot form
  assert float(optim._sum_of_squares(odd, True)) == 7 * 93


def test_l1_l2_penalty_counts_only_decayed_weights():
  params = _params()  # kernel: 6 ones; bias and norm scale excluded
  assert float(optim.penalty(params, l1=0.0, l2=0.0)) == 0.0
  assert float(optim.penalty(params, l1=0.1, l2=0.0)) == pytest.approx(0.6)
  assert float(optim.penalty(params, l1=0.0, l2=2.0)) == pytest.approx(6.0)


def test_parameter_moving_average_is_kept_in_the_optimizer_state():
  tx, _ = optim.make_optimizer(
    config_lib.entry("optimizer", "sgd", learning_rate=0.1, ema_decay=0.9, grad_clip_norm=10.0),
    config_lib.entry("schedule", "constant"),
    total_steps=10,
  )
  params = {"w": jnp.array([3.0, -2.0])}
  state = tx.init(params)
  expected = params["w"]
  assert optim.eval_params(params, state)["w"] is not None
  for _ in range(5):
    updates, state = tx.update({"w": 2 * params["w"]}, state, params)
    params = optax.apply_updates(params, updates)
    expected = 0.9 * expected + 0.1 * params["w"]  # the average of the iterates
  np.testing.assert_allclose(optim.eval_params(params, state)["w"], expected, rtol=1e-6)
  # A checkpoint's plain tree (dicts) holds it too; no average: the parameters themselves.
  as_read = {"0": {"0": {}, "1": {}}, "1": {"ema": {"w": expected}}}
  np.testing.assert_array_equal(optim.eval_params(params, as_read)["w"], expected)
  assert optim.eval_params(params, optax.sgd(0.1).init(params)) is params
  with pytest.raises(config_lib.ConfigError, match=r"ema_decay=1.0: must be in \[0, 1\)"):
    config = config_lib.base()
    config.optimizer.ema_decay = 1.0
    config_lib.validate(config)


def test_evaluation_reports_the_loss_without_label_smoothing():

  logits, labels = jax.random.normal(jax.random.key(0), (5, 7)), jnp.arange(5)
  smoothed, plain = experiment.make_losses(
    config_lib.entry("loss", "softmax_xent", label_smoothing=0.1)
  )
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
  np.testing.assert_allclose(plain(logits, labels), nll, rtol=1e-6)
  assert not np.allclose(smoothed(logits, labels), nll)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_integer_label_xent_equals_optax_one_hot_in_value_and_gradient(dtype):
  logits = (3 * jax.random.normal(jax.random.key(0), (4, 7, 300))).astype(dtype)
  labels = jax.random.randint(jax.random.key(1), (4, 7), 0, 300).at[0, :3].set(-1)  # -1: padding
  real = (labels >= 0).astype(jnp.float32)
  weights = jax.random.normal(jax.random.key(2), (4, 7))

  def loss(fn):
    return lambda z: jnp.sum(fn(z) * real * weights)

  ours = loss(lambda z: losses.xent_integer_labels(z, labels))
  theirs = loss(
    lambda z: optax.softmax_cross_entropy(z.astype(jnp.float32), jax.nn.one_hot(labels, 300))
  )
  np.testing.assert_allclose(ours(logits), theirs(logits), rtol=1e-6)
  got, want = jax.jit(jax.grad(ours))(logits), jax.grad(theirs)(logits)
  assert got.dtype == dtype and np.all(np.asarray(got[0, :3]) == 0)  # padding: no gradient
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=1e-6)
  # softmax_xent without smoothing is this loss.
  plain = registry.losses.get("softmax_xent")()
  np.testing.assert_array_equal(plain(logits, labels), losses.xent_integer_labels(logits, labels))


def _logits_with_ties(dtype):
  """Random logits with a row of equal values, a row whose max is at two places, a row
  mostly -inf (masked), and padding labels."""
  logits = 3 * jax.random.normal(jax.random.key(0), (4, 7, 300))
  logits = logits.at[1, 2].set(0.5).at[1, 3, jnp.array([40, 200])].set(100.0)
  logits = logits.at[2, 0, :150].set(-jnp.inf).astype(dtype)
  labels = jax.random.randint(jax.random.key(1), (4, 7), 0, 300).at[0, :3].set(-1)
  return logits, labels.at[2, 0].set(299)  # a finite logit's label


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_pass_xent_equals_two_pass_and_argmax(dtype):
  logits, labels = _logits_with_ties(dtype)
  maxes, sums, argmax = jax.jit(losses.logsumexp_argmax)(logits)
  logits32 = logits.astype(jnp.float32)
  np.testing.assert_array_equal(maxes, jnp.max(logits32, -1))
  np.testing.assert_allclose(sums, jnp.sum(jnp.exp(logits32 - maxes[..., None]), -1), rtol=1e-6)
  np.testing.assert_array_equal(argmax, jnp.argmax(logits, -1))  # ties: the first index
  assert argmax[1, 2] == 0 and argmax[1, 3] == 40
  real = (labels >= 0).astype(jnp.float32)
  weights = jax.random.normal(jax.random.key(2), (4, 7))
  one_pass = lambda z: jnp.sum(losses.xent_and_argmax(z, labels)[0] * real * weights)  # noqa: E731
  two_pass = lambda z: jnp.sum(losses.xent_integer_labels(z, labels) * real * weights)  # noqa: E731
  np.testing.assert_allclose(jax.jit(one_pass)(logits), two_pass(logits), rtol=1e-6)
  got, want = jax.jit(jax.grad(one_pass))(logits), jax.jit(jax.grad(two_pass))(logits)
  assert got.dtype == dtype and np.all(np.asarray(got[0, :3]) == 0)  # padding: no gradient
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=1e-6)
  # An infinite logit: no finite loss in either form (nan_policy halts or skips).
  for row in (logits.at[3, 1, 5].set(jnp.inf), logits.at[3, 1].set(-jnp.inf)):
    assert not np.isfinite(losses.xent_and_argmax(row, labels)[0][3, 1])
    assert not np.isfinite(losses.xent_integer_labels(row, labels)[3, 1])


def test_softmax_xent_takes_the_accuracy_argmax_from_its_pass_on_one_pass_backends(monkeypatch):
  logits, labels = _logits_with_ties(jnp.float32)
  plain, smoothed = (registry.losses.get("softmax_xent")(label_smoothing=s) for s in (0.0, 0.1))
  two_pass = jax.jit(lambda z: losses.loss_and_argmax(plain, z, labels))(logits)
  passes = []
  real_reduction = losses.logsumexp_argmax
  monkeypatch.setattr(losses, "logsumexp_argmax", lambda z: passes.append(1) or real_reduction(z))
  losses.loss_and_argmax(plain, logits, labels)
  assert not passes  # not a one-pass backend: two reductions and an argmax
  monkeypatch.setattr(losses, "ONE_PASS_XENT_BACKENDS", frozenset({jax.default_backend()}))
  one_pass = jax.jit(lambda z: losses.loss_and_argmax(plain, z, labels))(logits)
  assert passes == [1]
  np.testing.assert_allclose(one_pass[0], two_pass[0], rtol=1e-6)
  np.testing.assert_array_equal(one_pass[1], two_pass[1])
  losses.loss_and_argmax(smoothed, logits, labels)  # label smoothing: optax's form, own argmax
  assert passes == [1]


def test_one_pass_xent_with_classes_split_over_devices_equals_one_device():
  """Tensor parallelism splits the logits over classes: XLA partitions the variadic
  reduction (partial results per device, then combined)."""
  code = """if True:
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from research import losses
    logits = 3 * jax.random.normal(jax.random.key(0), (4, 8, 256))
    labels = jax.random.randint(jax.random.key(1), (4, 8), 0, 256)
    def loss(z):
      per_target, argmax = losses.xent_and_argmax(z, labels)
      return jnp.sum(per_target), argmax
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (value, argmax), grad = step(logits)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))  # as research's
    split = jax.device_put(logits, NamedSharding(mesh, PartitionSpec("data", None, "model")))
    (value8, argmax8), grad8 = step(split)
    assert len(grad8.sharding.device_set) == 8
    np.testing.assert_allclose(value8, value, rtol=1e-6)
    np.testing.assert_array_equal(argmax8, argmax)
    np.testing.assert_allclose(grad8, grad, atol=1e-6)
    print("ok")
  """
  env = dict(os.environ, XLA_FLAGS=devices_flags(8))
  run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
