"""The train state and the pure train and eval steps (no I/O; jitted by the trainer).

A batch is {"inputs", "targets"} (and "mask" in evaluation), plus
"decoder_inputs" for encoder-decoder models (passed as the model's second
argument). Images come as uint8 and become float32 in [0, 1] on the device;
token ids pass unchanged. Targets are labels (B,) or next tokens (B, L); a
negative target is padding and counts nowhere. Losses and accuracy are per
target, averaged over every real target of the batch; evaluation sums each
example's mean over its targets, and the targets' own sums.

Shapes: B batch, L length, K classes (or vocabulary), ... any trailing target axes.
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

from research import losses, optim


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training: one pytree, one checkpoint."""

  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any  # non-parameter variables, e.g. {"batch_stats": ...}; {} for most models

  def variables(self) -> dict:
    """What model.apply takes: params and model state."""
    return {"params": self.params, **self.model_state}

  def eval_variables(self) -> dict:
    """variables() with the parameters' moving average, if the optimizer keeps one."""
    return {"params": optim.eval_params(self.params, self.opt_state), **self.model_state}


def model_inputs(inputs: jax.Array) -> jax.Array:
  """uint8 images [0, 255] -> float32 [0, 1], on the device (keeps host transfers small);
  anything else (token ids) unchanged."""
  if inputs.dtype == jnp.uint8:
    return inputs.astype(jnp.float32) / 255.0
  return inputs


def model_args(batch) -> tuple:
  """The model's positional inputs: (inputs,) or (inputs, decoder_inputs)."""
  if "decoder_inputs" in batch:
    return (model_inputs(batch["inputs"]), batch["decoder_inputs"])
  return (model_inputs(batch["inputs"]),)


def init_state(
  model: nn.Module, tx: optax.GradientTransformation, params_key, example_inputs, boxed=False
):
  """A fresh TrainState; `boxed=True` keeps the logical axis names (for jax.eval_shape).

  `example_inputs`: one example's inputs with a batch axis of 1 (shape and dtype matter).
  """
  dummy = model_inputs(jnp.zeros(example_inputs.shape, example_inputs.dtype))
  variables = dict(model.init({"params": params_key}, dummy, train=False))
  if not boxed:
    variables = nn.meta.unbox(variables)
  params = variables.pop("params")
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),  # boxed params give boxed moments: FSDP shards them too
    model_state=variables,
  )


# The train step's metrics (research.train sums them over each log interval).
TRAIN_METRICS = ("nonfinite", "loss", "total_loss", "accuracy", "grad_norm", "learning_rate")


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
  microbatches: int = 1,
  train_model_state: bool = True,
):
  """train_step(state, batch) -> (state, metrics); randomness is a function of state.step.

  `train_model_state=False` runs the model in evaluation mode (a linear probe:
  BatchNorm uses and keeps its statistics, no dropout).

  metrics["nonfinite"] is 1.0 when the loss or a gradient is NaN/Inf; with
  skip_nonfinite that update is not applied (the step still advances).
  `sharding_context()` is entered while the model is traced (activation
  constraints; see research.sharding.activation_context). `microbatches` > 1
  accumulates gradients over that many slices of the batch (rows i, i+k, ...,
  so each device keeps its share of every slice): one update per batch, the
  activation memory of one slice.
  """

  def objective(params, model_state, inputs, targets_Bx_, dropout_rng):
    with sharding_context():
      if train_model_state:
        logits_Bx_xK, model_state = model.apply(
          {"params": params, **model_state}, *inputs, train=True, rngs={"dropout": dropout_rng},
          mutable=list(model_state),
        )  # fmt: skip
      else:
        logits_Bx_xK = model.apply({"params": params, **model_state}, *inputs, train=False)
    real_Bx_ = (targets_Bx_ >= 0).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(real_Bx_), 1.0)
    loss_Bx_, predicted_Bx_ = losses.loss_and_argmax(loss_fn, logits_Bx_xK, targets_Bx_)
    data_loss = jnp.sum(loss_Bx_ * real_Bx_) / count
    total = data_loss + optim.penalty(params, l1_penalty, l2_penalty)
    accuracy = jnp.sum((predicted_Bx_ == targets_Bx_) * real_Bx_) / count
    return total, (data_loss, accuracy, dict(model_state))

  gradients = jax.value_and_grad(objective, has_aux=True)

  def accumulated(params, model_state, inputs, targets, dropout_rng):
    """gradients() summed over microbatches, then averaged; model state (batch
    statistics) updated by each microbatch in turn."""
    split = lambda x: x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(
      0, 1
    )  # noqa: E731

    def add(carry, slice_and_index):
      sums, model_state = carry
      inputs_i, targets_i, i = slice_and_index
      (total, (data_loss, accuracy, model_state)), grads = gradients(
        params, model_state, inputs_i, targets_i, jax.random.fold_in(dropout_rng, i)
      )
      return (jax.tree.map(jnp.add, sums, (total, data_loss, accuracy, grads)), model_state), None

    scalar = jnp.zeros((), jnp.float32)
    zeros = (scalar, scalar, scalar, jax.tree.map(jnp.zeros_like, params))
    slices = (jax.tree.map(split, inputs), split(targets), jnp.arange(microbatches))
    (sums, model_state), _ = jax.lax.scan(add, (zeros, model_state), slices)
    total, data_loss, accuracy, grads = jax.tree.map(lambda x: x / microbatches, sums)
    return (total, (data_loss, accuracy, model_state)), grads

  def train_step(state: TrainState, batch):
    dropout_rng = jax.random.fold_in(dropout_key, state.step)
    args = (state.params, state.model_state, model_args(batch), batch["targets"], dropout_rng)
    step_fn = gradients if microbatches == 1 else accumulated
    (total, (data_loss, accuracy, model_state)), grads = step_fn(*args)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optim.global_norm(grads)  # the clipper's too: XLA computes it once
    # NaN/Inf in any gradient makes the norm NaN/Inf: one pass over the gradients
    # for both (a finite gradient whose square overflows float32 counts as Inf).
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      keep_old = lambda new, old: jnp.where(finite, new, old)
      params = jax.tree.map(keep_old, params, state.params)
      opt_state = jax.tree.map(keep_old, opt_state, state.opt_state)
      model_state = jax.tree.map(keep_old, model_state, state.model_state)
    metrics = {
      "nonfinite": 1.0 - finite.astype(jnp.float32),
      "loss": data_loss,
      "total_loss": total,
      "accuracy": accuracy,
      "grad_norm": grad_norm,
      "learning_rate": schedule(state.step),
    }
    new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state
    )
    assert tuple(metrics) == TRAIN_METRICS
    return new_state, metrics

  return train_step


def make_eval_step(
  model: nn.Module, loss_fn: Callable, sharding_context: Callable = contextlib.nullcontext
):
  """eval_step(variables, batch) -> sums over the real (unmasked) rows of the batch;
  variables: TrainState.variables() (params and model state)."""

  def eval_step(variables, batch):
    with sharding_context():
      logits_Bx_xK = model.apply(variables, *model_args(batch), train=False)
    targets_Bx_ = batch["targets"]
    mask_B = batch["mask"].astype(jnp.float32)
    real_BxT = (targets_Bx_ >= 0).reshape(targets_Bx_.shape[0], -1).astype(jnp.float32)
    real_BxT = real_BxT * mask_B[:, None]
    loss_Bx_, predicted_Bx_ = losses.loss_and_argmax(loss_fn, logits_Bx_xK, targets_Bx_)
    loss_BxT = loss_Bx_.reshape(real_BxT.shape)
    correct_BxT = (predicted_Bx_ == targets_Bx_).reshape(real_BxT.shape)
    per_target = jnp.maximum(jnp.sum(real_BxT, axis=1), 1.0)
    return {
      "loss_sum": jnp.sum(jnp.sum(loss_BxT * real_BxT, axis=1) / per_target),
      "correct": jnp.sum(jnp.sum(correct_BxT * real_BxT, axis=1) / per_target),
      "count": jnp.sum(mask_B),
      "target_loss_sum": jnp.sum(loss_BxT * real_BxT),
      "target_correct": jnp.sum(correct_BxT * real_BxT),
      "target_count": jnp.sum(real_BxT),
    }

  return eval_step
