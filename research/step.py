"""The train state and the pure train and eval steps (no I/O; jitted by the trainer).

Shapes: B batch, H height, W width, C channels, K classes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from research import optim


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training: one pytree, one checkpoint."""

  step: jax.Array
  params: Any
  opt_state: Any


def images_to_float(images_BxHxWxC: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [0, 1], on the device (keeps host transfers small)."""
  return images_BxHxWxC.astype(jnp.float32) / 255.0


def init_state(
  model: nn.Module, tx: optax.GradientTransformation, params_key, image_shape, boxed=False
):
  """A fresh TrainState; `boxed=True` keeps the logical axis names (for jax.eval_shape)."""
  dummy_1xHxWxC = jnp.zeros((1, *image_shape), jnp.float32)
  variables = model.init({"params": params_key}, dummy_1xHxWxC, train=False)
  params = variables["params"] if boxed else nn.meta.unbox(variables["params"])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  loss_fn: Callable,
  schedule: Callable,
  dropout_key: jax.Array,
  l1_penalty: float = 0.0,
  l2_penalty: float = 0.0,
  skip_nonfinite: bool = False,
  sharding_context: Callable = contextlib.nullcontext,
):
  """train_step(state, batch) -> (state, metrics); randomness is a function of state.step.

  metrics["nonfinite"] is 1.0 when the loss or a gradient is NaN/Inf; with
  skip_nonfinite that update is not applied (the step still advances).
  `sharding_context()` is entered while the model is traced (activation
  constraints; see research.sharding.activation_context).
  """

  def train_step(state: TrainState, batch):
    dropout_rng = jax.random.fold_in(dropout_key, state.step)
    images_BxHxWxC = images_to_float(batch["image"])

    def objective(params):
      with sharding_context():
        logits_BxK = model.apply(
          {"params": params}, images_BxHxWxC, train=True, rngs={"dropout": dropout_rng}
        )
      data_loss = jnp.mean(loss_fn(logits_BxK, batch["label"]))
      total = data_loss + optim.penalty(params, l1_penalty, l2_penalty)
      return total, (data_loss, logits_BxK)

    (total, (data_loss, logits_BxK)), grads = jax.value_and_grad(objective, has_aux=True)(
      state.params
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(total) & jnp.all(
      jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    )
    if skip_nonfinite:
      keep_old = lambda new, old: jnp.where(finite, new, old)
      params = jax.tree.map(keep_old, params, state.params)
      opt_state = jax.tree.map(keep_old, opt_state, state.opt_state)
    metrics = {
      "nonfinite": 1.0 - finite.astype(jnp.float32),
      "loss": data_loss,
      "total_loss": total,
      "accuracy": jnp.mean(jnp.argmax(logits_BxK, -1) == batch["label"]),
      "grad_norm": optax.global_norm(grads),
      "learning_rate": schedule(state.step),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(
  model: nn.Module, loss_fn: Callable, sharding_context: Callable = contextlib.nullcontext
):
  """eval_step(params, batch) -> sums over the real (unmasked) rows of the batch."""

  def eval_step(params, batch):
    with sharding_context():
      logits_BxK = model.apply({"params": params}, images_to_float(batch["image"]), train=False)
    mask_B = batch["mask"].astype(jnp.float32)
    correct_B = (jnp.argmax(logits_BxK, -1) == batch["label"]).astype(jnp.float32)
    return {
      "loss_sum": jnp.sum(loss_fn(logits_BxK, batch["label"]) * mask_B),
      "correct": jnp.sum(correct_B * mask_B),
      "count": jnp.sum(mask_B),
    }

  return eval_step
