"""Per-target losses, registered by name: fn(logits_Bx_xK, labels_Bx_) -> loss_Bx_.

Shapes: B batch, _ any further target axes (L for next-token targets), K classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from research import registry


@registry.losses.register("softmax_xent")
def softmax_xent(label_smoothing: float = 0.0):
  """Softmax cross-entropy on integer labels, with optional label smoothing."""

  def loss_fn(logits_Bx_xK: jax.Array, labels_Bx_: jax.Array) -> jax.Array:
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
