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
  safe_Bx_ = jnp.clip(labels_Bx_, 0, logits_Bx_xK.shape[-1] - 1)
  label_logits_Bx_ = jnp.take_along_axis(logits_Bx_xK32, safe_Bx_[..., None], axis=-1)[..., 0]
  loss_Bx_ = max_Bx_ + jnp.log(sum_exp_Bx_) - label_logits_Bx_
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


@registry.losses.register("softmax_xent")
def softmax_xent(label_smoothing: float = 0.0):
  """Softmax cross-entropy on integer labels, with optional label smoothing."""

  def loss_fn(logits_Bx_xK: jax.Array, labels_Bx_: jax.Array) -> jax.Array:
    if label_smoothing == 0.0:
      return xent_integer_labels(logits_Bx_xK, labels_Bx_)
    num_classes = logits_Bx_xK.shape[-1]
    targets_Bx_xK = optax.smooth_labels(jax.nn.one_hot(labels_Bx_, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits_Bx_xK.astype(jnp.float32), targets_Bx_xK)

  return loss_fn


@registry.losses.register("mse")
def mse():
  """Mean squared error between the outputs and one-hot targets (per example)."""

  def loss_fn(logits_Bx_xK: jax.Array, labels_Bx_: jax.Array) -> jax.Array:
    targets_Bx_xK = jax.nn.one_hot(labels_Bx_, logits_Bx_xK.shape[-1])
    return jnp.mean(jnp.square(logits_Bx_xK.astype(jnp.float32) - targets_Bx_xK), axis=-1)

  return loss_fn
