"""Per-target losses, registered by name: fn(logits_Bx_xK, labels_Bx_) -> loss_Bx_.

Shapes: B batch, _ any further target axes (L for next-token targets), K classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from research import registry


@jax.custom_vjp
def xent_integer_labels(logits_Bx_xK: jax.Array, labels_Bx_: jax.Array) -> jax.Array:
  """logsumexp(logits) - logits[label], in float32: optax's softmax cross-entropy on
  one-hot targets, in fewer passes over the logits.

  The one-hot form reads every logit again to sum targets x log-softmax (on an H200,
  2.8 of the 124M-parameter GPT-2 shape's 62 ms step, for 32,768 x 50,304 logits);
  here the label's logit is a gather, and the gradient softmax - one_hot is one fused
  pass. Labels outside [0, K) (padding) give a finite value, which callers mask out
  (a zero cotangent: no gradient).
  """
  return _xent_fwd(logits_Bx_xK, labels_Bx_)[0]


def _xent_fwd(logits_Bx_xK, labels_Bx_):
  logits_Bx_xK32 = logits_Bx_xK.astype(jnp.float32)
  max_Bx_ = jnp.max(logits_Bx_xK32, axis=-1)
  max_Bx_ = jnp.where(jnp.isfinite(max_Bx_), max_Bx_, 0.0)  # as jax.nn.logsumexp
  sum_exp_Bx_ = jnp.sum(jnp.exp(logits_Bx_xK32 - max_Bx_[..., None]), axis=-1)
  return _xent_from_parts(logits_Bx_xK, labels_Bx_, max_Bx_, sum_exp_Bx_)


def _xent_from_parts(logits_Bx_xK, labels_Bx_, max_Bx_, sum_exp_Bx_):
  """The loss and the backward's residuals from the row's max and sum of exp(z - max)."""
  safe_Bx_ = jnp.clip(labels_Bx_, 0, logits_Bx_xK.shape[-1] - 1)
  label_logits_Bx_ = jnp.take_along_axis(logits_Bx_xK, safe_Bx_[..., None], axis=-1)[..., 0]
  loss_Bx_ = max_Bx_ + jnp.log(sum_exp_Bx_) - label_logits_Bx_.astype(jnp.float32)
  return loss_Bx_, (logits_Bx_xK, labels_Bx_, max_Bx_, sum_exp_Bx_)


def _xent_bwd(residuals, g_Bx_):
  # The softmax from the forward's max and sum, divided (not exp(z - logsumexp)): its
  # rows then sum to 1 as closely as jax.nn.softmax's, and tensor-parallel training
  # (logits split over classes) follows one device's to 3e-7 over 50 steps (the other
  # form drifted from step 12 to 4e-3 on the MNIST CNN, tests/test_sharding.py).
  logits_Bx_xK, labels_Bx_, max_Bx_, sum_exp_Bx_ = residuals
  classes_Bx_xK = jax.lax.broadcasted_iota(
    labels_Bx_.dtype, logits_Bx_xK.shape, logits_Bx_xK.ndim - 1
  )
  exp_Bx_xK = jnp.exp(logits_Bx_xK.astype(jnp.float32) - max_Bx_[..., None])
  softmax_Bx_xK = exp_Bx_xK / sum_exp_Bx_[..., None]
  dlogits_Bx_xK = g_Bx_[..., None] * (softmax_Bx_xK - (classes_Bx_xK == labels_Bx_[..., None]))
  return dlogits_Bx_xK.astype(logits_Bx_xK.dtype), None


xent_integer_labels.defvjp(_xent_fwd, _xent_bwd)


# Backends whose softmax cross-entropy takes the row's max, sum of exponentials and
# argmax in one pass over the logits (logsumexp_argmax) instead of two reductions and
# an argmax. The GPU: GPT-2 small at 124M parameters under research.train on an H200
# (results/benchmarks_gpu.md, 2026-11-28), each pair side by side in one call: 45.1%
# against 44.9% MFU at batch 128, 44.9% against 44.7-44.9% in the reverse order, 44.1-44.2%
# against 43.9-44.2% at batch 64. On the CPU (2 cores, value and gradient, alternating)
# neither form wins: one pass took 0.6-0.85 of the time for bfloat16 logits (1,024 x
# 50,304; 65,536 x 512), 1.0 for float32 at 50,304 classes, 1.4-1.7 for float32 at 1,024.
ONE_PASS_XENT_BACKENDS: frozenset[str] = frozenset({"gpu"})


def _online_combine(a, b):
  """Two partials (max, sum of exp(z - max), first index of the max) -> one."""
  max_a, sum_a, index_a = a
  max_b, sum_b, index_b = b
  a_wins = max_a >= max_b
  # The smaller partial's sum rescaled to the larger max: exp(-|max_a - max_b|), one exp
  # (equal maxima, -inf's included: 1, and no inf - inf).
  scale = jnp.exp(-jnp.where(max_a == max_b, 0.0, jnp.abs(max_a - max_b)))
  total = jnp.where(a_wins, sum_a + sum_b * scale, sum_a * scale + sum_b)
  first = (max_a > max_b) | ((max_a == max_b) & (index_a < index_b))  # as jnp.argmax
  return jnp.maximum(max_a, max_b), total, jnp.where(first, index_a, index_b)


def logsumexp_argmax(logits_Bx_xK: jax.Array):
  """(max, sum of exp(z - max), argmax) of each row, in float32, from one variadic
  reduction over the logits: the online softmax's combination of partial sums, with
  the max's first index (jnp.argmax's ties) carried along."""
  logits_Bx_xK32 = logits_Bx_xK.astype(jnp.float32)
  last = logits_Bx_xK.ndim - 1
  index_Bx_xK = jax.lax.broadcasted_iota(jnp.int32, logits_Bx_xK.shape, last)
  init = (jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.int32(jnp.iinfo(jnp.int32).max))
  operands = (logits_Bx_xK32, jnp.ones_like(logits_Bx_xK32), index_Bx_xK)
  return jax.lax.reduce(operands, init, _online_combine, (last,))


@jax.custom_vjp
def xent_and_argmax(logits_Bx_xK: jax.Array, labels_Bx_: jax.Array):
  """(xent_integer_labels(logits, labels), argmax(logits, -1)) from one pass over the
  logits in the forward (logsumexp_argmax); the same gradient."""
  return _xent_and_argmax_fwd(logits_Bx_xK, labels_Bx_)[0]


def _xent_and_argmax_fwd(logits_Bx_xK, labels_Bx_):
  max_Bx_, sum_exp_Bx_, argmax_Bx_ = logsumexp_argmax(logits_Bx_xK)
  finite_Bx_ = jnp.isfinite(max_Bx_)
  max_Bx_ = jnp.where(finite_Bx_, max_Bx_, 0.0)  # the backward as the two-pass form's
  loss_Bx_, residuals = _xent_from_parts(logits_Bx_xK, labels_Bx_, max_Bx_, sum_exp_Bx_)
  # A row whose max is +-inf has no finite loss (the two-pass form: inf or NaN); the sum
  # here is relative to that max, so say NaN rather than a finite number.
  loss_Bx_ = jnp.where(finite_Bx_, loss_Bx_, jnp.nan)
  return (loss_Bx_, argmax_Bx_), residuals


def _xent_and_argmax_bwd(residuals, cotangents):
  return _xent_bwd(residuals, cotangents[0])


xent_and_argmax.defvjp(_xent_and_argmax_fwd, _xent_and_argmax_bwd)


def loss_and_argmax(loss_fn, logits_Bx_xK: jax.Array, labels_Bx_: jax.Array):
  """(loss_fn(logits, labels), argmax(logits, -1)): on ONE_PASS_XENT_BACKENDS, from the
  loss's own pass over the logits where the loss offers one (`loss_fn.and_argmax`)."""
  fused = getattr(loss_fn, "and_argmax", None)
  if fused is not None and jax.default_backend() in ONE_PASS_XENT_BACKENDS:
    return fused(logits_Bx_xK, labels_Bx_)
  return loss_fn(logits_Bx_xK, labels_Bx_), jnp.argmax(logits_Bx_xK, -1)


@registry.losses.register("softmax_xent")
def softmax_xent(label_smoothing: float = 0.0):
  """Softmax cross-entropy on integer labels, with optional label smoothing."""

  def loss_fn(logits_Bx_xK: jax.Array, labels_Bx_: jax.Array) -> jax.Array:
    if label_smoothing == 0.0:
      return xent_integer_labels(logits_Bx_xK, labels_Bx_)
    num_classes = logits_Bx_xK.shape[-1]
    targets_Bx_xK = optax.smooth_labels(jax.nn.one_hot(labels_Bx_, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits_Bx_xK.astype(jnp.float32), targets_Bx_xK)

  if label_smoothing == 0.0:
    loss_fn.and_argmax = xent_and_argmax
  return loss_fn


@registry.losses.register("mse")
def mse():
  """Mean squared error between the outputs and one-hot targets (per example)."""

  def loss_fn(logits_Bx_xK: jax.Array, labels_Bx_: jax.Array) -> jax.Array:
    targets_Bx_xK = jax.nn.one_hot(labels_Bx_, logits_Bx_xK.shape[-1])
    return jnp.mean(jnp.square(logits_Bx_xK.astype(jnp.float32) - targets_Bx_xK), axis=-1)

  return loss_fn
