"""Per-example losses, registered by name: fn(logits_BxK, labels_B) -> loss_B.

Shapes: B batch, K classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from research import registry


@registry.losses.register("softmax_xent")
def softmax_xent(label_smoothing: float = 0.0):
  """Softmax cross-entropy on integer labels, with optional label smoothing."""

  def loss_fn(logits_BxK: jax.Array, labels_B: jax.Array) -> jax.Array:
    num_classes = logits_BxK.shape[-1]
    targets_BxK = optax.smooth_labels(jax.nn.one_hot(labels_B, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits_BxK.astype(jnp.float32), targets_BxK)

  return loss_fn


@registry.losses.register("mse")
def mse():
  """Mean squared error between the outputs and one-hot targets (per example)."""

  def loss_fn(logits_BxK: jax.Array, labels_B: jax.Array) -> jax.Array:
    targets_BxK = jax.nn.one_hot(labels_B, logits_BxK.shape[-1])
    return jnp.mean(jnp.square(logits_BxK.astype(jnp.float32) - targets_BxK), axis=-1)

  return loss_fn
