"""Optax optimizers and learning-rate schedules from the config.

`config.optimizer` holds `name`, the keys every optimizer shares (COMMON_KEYS)
and the keyword arguments of the named factory below; `config.schedule` holds
`name` and the keyword arguments of its factory.

`optimizer.ema_decay` > 0 also keeps an exponential moving average of the
parameters (Polyak averaging) in the optimizer state: sharded, checkpointed
and resumed with it; evaluation then uses the average (`eval_params`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from research import config as config_lib
from research import registry, runtime

# Keys of config.optimizer that every optimizer accepts.
COMMON_KEYS = (
  "learning_rate", "weight_decay", "grad_clip_norm", "l1_penalty", "l2_penalty", "ema_decay"
)  # fmt: skip


def global_norm(tree) -> jax.Array:
  """optax.global_norm (the square root of the sum of all squared entries, in float32),
  on the CPU in the form its XLA flags reduce fastest (`_sum_of_squares`); elsewhere
  optax's own. The train step's metric and finiteness check and clip_by_global_norm
  both use it, so that a clipped step computes the norm once (XLA merges the two
  identical computations)."""
  if jax.default_backend() != "cpu":
    return optax.global_norm(tree)
  # By rows on one device only: on a mesh, a leaf sharded along its last axis would be
  # gathered to be cut into rows, where a dot sums each device's part.
  by_rows = jax.device_count() == 1 and not runtime.ynn_reduces()
  squares = [_sum_of_squares(x, by_rows) for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))


def _sum_of_squares(x: jax.Array, by_rows: bool, rows: int = 8) -> jax.Array:
  """A leaf's sum of squares in float32. `by_rows`: for XLA:CPU's own reductions (the
  LM's flags leave reductions to it), the leaf as `rows` rows, squared and added row by
  row in one elementwise pass (both cores, vectorised), then the one row reduced: the
  benchmark LM's 28.3M gradients in 4.7-5.7 ms, where XLA reduced them in 43-52 ms
  (sum of squares, or a dot of each leaf with itself, which XLA rewrites to one) and a
  Gram matrix of 8 columns by dot took 15 ms. Otherwise (YNNPACK's reductions, every
  other model's flags) a dot of the leaf with itself over all its axes: 5.2 ms there,
  where the rows took 50 ms. 2-core CPU, side by side in one process. In the LM's train
  step: 8.41 -> 8.22 GB accessed (XLA's count), the fastest of 14 alternating steps
  2.068 -> 2.041 s (a noisy machine: medians 2.49 -> 2.22 s)."""
  if by_rows and x.size % rows == 0 and x.size >= 64 * rows:
    r = x.reshape(rows, -1).astype(jnp.float32)
    total = r[0] * r[0]
    for i in range(1, rows):
      total = total + r[i] * r[i]
    return jnp.sum(total)
  return jnp.tensordot(x, x, x.ndim, preferred_element_type=jnp.float32)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm (the same updates and empty state) with global_norm:
  updates scaled by max_norm / norm when the norm reaches max_norm."""

  def update(updates, state, params=None):
    del params
    norm = global_norm(updates)
    clip = lambda t: jax.lax.select(norm < max_norm, t, (t / norm.astype(t.dtype)) * max_norm)  # noqa: E731
    return jax.tree.map(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class ParamsEMAState(NamedTuple):
  ema: Any  # a tree like the parameters


def params_ema(decay: float) -> optax.GradientTransformation:
  """Leaves the updates alone; tracks ema <- decay * ema + (1 - decay) * new params.

  Chained last, so it sees the final updates. Starts at the initial parameters.
  """

  def init(params):
    return ParamsEMAState(ema=jax.tree.map(lambda p: p, params))

  def update(updates, state, params):
    new_params = optax.apply_updates(params, updates)
    mix = lambda e, p: decay * e + (1.0 - decay) * p  # noqa: E731
    return updates, ParamsEMAState(ema=jax.tree.map(mix, state.ema, new_params))

  return optax.GradientTransformation(init, update)


def eval_params(params, opt_state):
  """The parameters to evaluate: their moving average if the optimizer keeps one.

  `opt_state`: the live state, or the plain tree a checkpoint reads back as.
  """

  def find(node):
    if isinstance(node, ParamsEMAState):
      return node.ema
    if isinstance(node, dict) and "ema" in node:
      return node["ema"]
    children = node.values() if isinstance(node, dict) else node
    if isinstance(node, dict | tuple | list):
      return next((f for f in map(find, children) if f is not None), None)
    return None

  ema = find(opt_state)
  return params if ema is None else ema


def decay_mask(params):
  """True for weights that weight decay and penalties apply to: not biases, not norms."""

  def is_decayed(path, leaf):
    names = [str(getattr(k, "key", k)).lower() for k in path]
    return leaf.ndim > 1 and not any("norm" in n or n == "scale" for n in names)

  return jax.tree_util.tree_map_with_path(is_decayed, params)


def penalty(params, l1: float, l2: float) -> jax.Array:
  """l1 * sum|w| + l2/2 * sum w^2 over the decayed weights (added to the loss)."""
  total = jnp.zeros((), jnp.float32)
  if not (l1 or l2):
    return total
  leaves = jax.tree.leaves(jax.tree.map(lambda p, m: p if m else None, params, decay_mask(params)))
  for w in leaves:
    w = w.astype(jnp.float32)
    total += l1 * jnp.sum(jnp.abs(w)) + 0.5 * l2 * jnp.sum(jnp.square(w))
  return total


# --- Schedules: factory(base_learning_rate, total_steps, **kwargs) -> schedule.


@registry.schedules.register("constant")
def constant(learning_rate: float, total_steps: int):
  del total_steps
  return optax.constant_schedule(learning_rate)


@registry.schedules.register("cosine")
def cosine(learning_rate: float, total_steps: int, alpha: float = 0.0):
  """Cosine decay from `learning_rate` to `alpha * learning_rate`."""
  return optax.cosine_decay_schedule(learning_rate, total_steps, alpha)


@registry.schedules.register("warmup_cosine")
def warmup_cosine(
  learning_rate: float, total_steps: int, warmup_steps: int = 0, end_value: float = 0.0
):
  """Linear warm-up from 0 over `warmup_steps`, then cosine decay to `end_value`."""
  if warmup_steps >= total_steps:
    raise ValueError(f"schedule.warmup_steps={warmup_steps} must be < total steps {total_steps}")
  return optax.warmup_cosine_decay_schedule(
    0.0, learning_rate, warmup_steps, total_steps, end_value
  )


@registry.schedules.register("piecewise")
def piecewise(
  learning_rate: float,
  total_steps: int,
  boundaries: tuple[int, ...] = (),
  scales: tuple[float, ...] = (),
):
  """Multiply the rate by scales[i] at step boundaries[i] (steps, ascending)."""
  del total_steps
  if len(boundaries) != len(scales):
    raise ValueError(
      f"schedule.boundaries ({len(boundaries)}) and schedule.scales ({len(scales)}) "
      "must have the same length"
    )
  return optax.piecewise_constant_schedule(
    learning_rate, dict(zip(boundaries, scales, strict=True))
  )


@registry.schedules.register("one_cycle")
def one_cycle(
  learning_rate: float,
  total_steps: int,
  pct_start: float = 0.3,
  div_factor: float = 25.0,
  final_div_factor: float = 1e4,
):
  """Smith's one-cycle policy: cosine up to `learning_rate`, then cosine down."""
  return optax.cosine_onecycle_schedule(
    total_steps, learning_rate, pct_start, div_factor, final_div_factor
  )


@registry.schedules.register("warmup_rsqrt")
def warmup_rsqrt(
  learning_rate: float,
  total_steps: int,
  warmup_steps: int = 0,
  timescale: int = 10_000,
  cooldown_steps: int = 0,
):
  """big_vision's "rsqrt": linear warm-up over `warmup_steps`, then the rate times
  1 / sqrt(1 + (step - warmup_steps) / timescale), and over the last `cooldown_steps`
  a linear cool-down to 0 (Zhai et al. 2022, scaling ViTs)."""
  if warmup_steps + cooldown_steps > total_steps or timescale <= 0:
    raise ValueError(
      f"schedule.warmup_steps={warmup_steps} + schedule.cooldown_steps={cooldown_steps} must "
      f"be <= total steps {total_steps}, and schedule.timescale={timescale} > 0"
    )

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    rate = learning_rate / jnp.sqrt(1.0 + jnp.maximum(step - warmup_steps, 0.0) / timescale)
    if warmup_steps:
      rate = rate * jnp.minimum(1.0, step / warmup_steps)
    if cooldown_steps:
      rate = rate * jnp.clip((total_steps - step) / cooldown_steps, 0.0, 1.0)
    return rate

  return schedule


WSD_DECAY_SHAPES = ("linear", "1-sqrt")


@registry.schedules.register("warmup_stable_decay")
def warmup_stable_decay(
  learning_rate: float,
  total_steps: int,
  warmup_steps: int = 0,
  decay_fraction: float = 0.2,
  decay_shape: str = "linear",
  end_value: float = 0.0,
):
  """Warm-up, stable, decay (WSD; Hu et al. 2024, Hägele et al. 2024): linear warm-up,
  `learning_rate` held, then over the last `decay_fraction` of the steps a decay to
  `end_value`, "linear" or "1-sqrt" (1 - sqrt(progress), the shape Hägele et al.
  found best). The rate before a decay does not depend on the budget, so a checkpoint
  from the stable phase resumed with a larger num_train_steps (--allow_config_change)
  continues as a run of that budget, bit for bit (tests/test_train.py): one run,
  several training budgets, for scaling studies."""
  decay_steps = int(round(decay_fraction * total_steps))
  if decay_shape not in WSD_DECAY_SHAPES or not 0.0 <= decay_fraction <= 1.0:
    raise ValueError(
      f"schedule.decay_shape={decay_shape!r} (valid: {', '.join(WSD_DECAY_SHAPES)}), "
      f"schedule.decay_fraction={decay_fraction} (valid: 0 to 1)"
    )
  if warmup_steps + decay_steps > total_steps:
    raise ValueError(
      f"schedule.warmup_steps={warmup_steps} + the decay's {decay_steps} steps "
      f"(decay_fraction={decay_fraction}) must be <= total steps {total_steps}"
    )
  decay_start = total_steps - decay_steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, step / warmup_steps) if warmup_steps else 1.0
    progress = jnp.clip((step - decay_start) / max(decay_steps, 1), 0.0, 1.0)
    left = 1.0 - progress if decay_shape == "linear" else 1.0 - jnp.sqrt(progress)
    return warm * (end_value + (learning_rate - end_value) * left)

  return schedule


# --- Optimizers: factory(schedule, weight_decay, **kwargs) -> GradientTransformation.


def _coupled_decay(weight_decay: float):
  if not weight_decay:
    return optax.identity()
  return optax.add_decayed_weights(weight_decay, mask=decay_mask)


@registry.optimizers.register("sgd")
def sgd(schedule, weight_decay: float):
  return optax.chain(_coupled_decay(weight_decay), optax.sgd(schedule))


@registry.optimizers.register("momentum")
def momentum(schedule, weight_decay: float, momentum: float = 0.9, nesterov: bool = False):
  return optax.chain(
    _coupled_decay(weight_decay), optax.sgd(schedule, momentum=momentum, nesterov=nesterov)
  )


@registry.optimizers.register("adam")
def adam(schedule, weight_decay: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
  return optax.chain(_coupled_decay(weight_decay), optax.adam(schedule, b1, b2, eps))


@registry.optimizers.register("adamw")
def adamw(schedule, weight_decay: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
  """Adam with decoupled weight decay (Loshchilov & Hutter), masked off biases and norms."""
  return optax.adamw(schedule, b1, b2, eps, weight_decay=weight_decay, mask=decay_mask)


@registry.optimizers.register("lion")
def lion(schedule, weight_decay: float, b1: float = 0.9, b2: float = 0.99):
  """Lion (Chen et al. 2023): the sign of an interpolated momentum; decoupled weight
  decay masked off biases and norms. Its rates are ~3-10x below AdamW's."""
  return optax.lion(schedule, b1, b2, weight_decay=weight_decay, mask=decay_mask)


@registry.optimizers.register("adafactor")
def adafactor(
  schedule,
  weight_decay: float,
  min_dim_size_to_factor: int = 128,
  decay_rate: float = 0.8,
  clipping_threshold: float = 1.0,
  momentum: float = 0.0,
  multiply_by_parameter_scale: bool = True,
):
  """Adafactor (Shazeer & Stern 2018) from optax's parts: second moments of a matrix kept
  as a row and a column vector (dimensions >= min_dim_size_to_factor; replicated over
  the mesh), updates clipped to RMS `clipping_threshold` (0: off) and scaled by the
  parameter's RMS; `momentum` 0: none. Weight decay as in adamw, times the rate and
  masked off biases and norms (optax.adafactor's `weight_decay_rate` is not multiplied
  by the rate: 0.1 there shrank the LM's weights to a uniform prediction in 150 steps)."""
  return optax.chain(
    optax.scale_by_factored_rms(
      decay_rate=decay_rate, min_dim_size_to_factor=min_dim_size_to_factor
    ),
    optax.clip_by_block_rms(clipping_threshold) if clipping_threshold else optax.identity(),
    optax.scale_by_param_block_rms() if multiply_by_parameter_scale else optax.identity(),
    optax.ema(momentum, debias=False) if momentum else optax.identity(),
    optax.add_decayed_weights(weight_decay, mask=decay_mask) if weight_decay else optax.identity(),
    optax.scale_by_learning_rate(schedule),
  )


def factory_keys(optimizer_name: str) -> list[str]:
  """Config keys the named optimizer accepts besides COMMON_KEYS."""
  params = registry.optimizers.parameters(optimizer_name)
  return [k for k in params if k not in ("schedule", "weight_decay")]


def make_schedule(schedule_config, learning_rate: float, total_steps: int):
  kwargs = {k: v for k, v in schedule_config.items() if k != "name"}
  try:
    return registry.schedules.get(schedule_config.name)(learning_rate, total_steps, **kwargs)
  except ValueError as e:  # the factories' checks name the schedule's keys
    raise config_lib.ConfigError(str(e)) from None


def make_optimizer(optimizer_config, schedule_config, total_steps: int, labels=None, scale=1.0):
  """Returns (optax transformation, learning-rate schedule).

  `labels`: None, or params -> a tree of research.transfer's labels: "frozen"
  parameters get no updates (and no optimizer state), "backbone" ones their
  updates times `scale`, "trained" ones the optimizer as configured.
  """
  schedule = make_schedule(schedule_config, optimizer_config.learning_rate, total_steps)
  kwargs = {
    k: optimizer_config[k] for k in factory_keys(optimizer_config.name) if k in optimizer_config
  }
  make = lambda: registry.optimizers.get(optimizer_config.name)(  # noqa: E731
    schedule, optimizer_config.weight_decay, **kwargs
  )
  tx = make()
  if labels is not None:
    transforms = {
      "trained": tx,
      "backbone": optax.chain(make(), optax.scale(scale)),
      "frozen": optax.set_to_zero(),
    }
    tx = optax.multi_transform(transforms, labels)
  if optimizer_config.grad_clip_norm:
    tx = optax.chain(clip_by_global_norm(optimizer_config.grad_clip_norm), tx)
  if optimizer_config.get("ema_decay", 0.0):
    tx = optax.chain(tx, params_ema(optimizer_config.ema_decay))
  return tx, schedule
