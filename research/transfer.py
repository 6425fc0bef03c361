"""Transfer learning: start a run from another run's checkpoint (`config.init`).

Every array of the new model has a name: `params/conv1/kernel`,
`model_state/batch_stats/bn1/mean`, ... Each is either

- re-initialised: it matches a regex of `config.init.reinit` (by default the
  classification head, `params/head/.*`), or
- loaded: the first regex of `config.init.rules` that matches it names its
  source. A plain regex loads the array of the same name; `TARGET=>SOURCE`
  loads from a renamed one (`re.sub` of the match, so `\\1` works), e.g.
  `params/backbone/(.*)=>params/\\1`.

Anything else is an error before training starts, one line listing every
array that no rule covers, that the checkpoint lacks, or whose shape differs.
The source's evaluation parameters are loaded (its moving average, if it kept
one), with its BatchNorm statistics.

`config.init.mode`:
- "finetune": every parameter trains; `backbone_lr_scale` < 1 gives the
  loaded ones a lower learning rate (a multiplier on their updates);
- "linear_probe": only the re-initialised parameters train (optax
  multi_transform, the frozen ones get zero updates and keep no optimizer
  state); the model runs in evaluation mode, so BatchNorm uses the loaded
  statistics, leaves them unchanged, and dropout is off;
- "continue": the whole train state (step, parameters, optimizer and model
  state) is restored onto this run's mesh and training goes on from its step,
  under this run's config (rules and reinit do not apply): a branch of another
  run, e.g. a warmup_stable_decay run's stable-phase checkpoint decayed over a
  new num_train_steps, which ends as a run of that budget would.
"""

from __future__ import annotations

import re
from pathlib import Path

from research.config import ConfigError

MODES = ("finetune", "linear_probe", "continue")
TRAINED, BACKBONE, FROZEN = "trained", "backbone", "frozen"


def _matches(patterns, name: str) -> bool:
  return any(re.fullmatch(p, name) for p in patterns)


def source_name(rules, name: str) -> str | None:
  """The source array's name for target `name`, by the first rule that matches; None if none."""
  for rule in rules:
    target, arrow, source = rule.partition("=>")
    match = re.fullmatch(target, name)
    if match:
      return match.expand(source) if arrow else name
  return None


def param_labels(init_config):
  """None when every parameter trains alike, else params -> labels for optim.partitioned:
  TRAINED for the re-initialised ones, FROZEN or BACKBONE (scaled) for the loaded ones."""
  if not init_config.checkpoint or init_config.mode == "continue":
    return None
  if init_config.mode == "finetune" and init_config.backbone_lr_scale == 1.0:
    return None
  loaded = FROZEN if init_config.mode == "linear_probe" else BACKBONE
  reinit = tuple(init_config.reinit)

  def labels(params):
    import jax
    from flax import linen as nn

    from research.sharding import path_name

    return jax.tree_util.tree_map_with_path(
      lambda path, _: TRAINED if _matches(reinit, "params/" + path_name(path)) else loaded,
      params,
      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),  # boxed: one label per array
    )

  return labels


def trains_model_state(init_config) -> bool:
  """False in a linear probe: the model runs in evaluation mode (BatchNorm statistics fixed)."""
  return not (init_config.checkpoint and init_config.mode == "linear_probe")


def resolve_checkpoint(path: str) -> tuple[Path, int | None]:
  """A run's workdir, its checkpoints/ directory or checkpoints/STEP -> (directory, step)."""
  p = Path(path)
  if p.name.isdigit() and p.parent.is_dir():
    return p.parent, int(p.name)
  if (p / "checkpoints").is_dir():
    return p / "checkpoints", None
  return p, None


def evaluation_arrays(directory: Path, step: int | None) -> tuple[int, dict]:
  """(step, {name: numpy array}) of the variables a checkpoint evaluates with: its
  parameters' moving average if it kept one, and its model state. FileNotFoundError
  if there is no such checkpoint."""
  import jax

  from research import checkpoint, optim
  from research.sharding import path_name

  step, tree = checkpoint.read_tree(directory, step)
  variables = {
    "params": optim.eval_params(tree["params"], tree.get("opt_state")),
    "model_state": tree.get("model_state", {}),
  }
  flat = jax.tree_util.tree_flatten_with_path(variables)[0]
  return step, {path_name(p): leaf for p, leaf in flat}


def read_source(path: str) -> tuple[int, Path, dict]:
  """(step, directory, {name: numpy array}) of the evaluation variables saved at `path`."""
  directory, step = resolve_checkpoint(path)
  if not directory.is_dir():
    raise ConfigError(f"config.init.checkpoint={path!r}: no such directory")
  try:
    step, arrays = evaluation_arrays(directory, step)
  except FileNotFoundError as e:
    raise ConfigError(f"config.init.checkpoint={path!r}: {e}") from None
  return step, directory, arrays


def _listing(names: list[str], limit: int = 6) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def plan(target_shapes: dict, source: dict, init_config, origin: str = "") -> tuple[dict, list]:
  """({target: source name} to load, [targets initialised fresh]); ConfigError listing every
  problem (unmatched, missing in the checkpoint, shape mismatch) in one line, which
  starts with `origin` (default: config.init.checkpoint=...)."""
  reinit, rules = tuple(init_config.reinit), tuple(init_config.rules)
  loads, fresh, unmatched, missing, mismatched = {}, [], [], [], []
  for name, shape in target_shapes.items():
    if _matches(reinit, name):
      fresh.append(name)
      continue
    wanted = source_name(rules, name)
    if wanted is None:
      unmatched.append(name)
    elif wanted not in source:
      missing.append(name if wanted == name else f"{name} (from {wanted})")
    elif tuple(source[wanted].shape) != tuple(shape):
      mismatched.append(f"{wanted} {tuple(source[wanted].shape)} -> {name} {tuple(shape)}")
    else:
      loads[name] = wanted
  problems = []
  if unmatched:
    problems.append(
      f"matched by no config.init.rules {list(rules)} nor config.init.reinit {list(reinit)}: "
      + _listing(unmatched)
    )
  if missing:
    problems.append("not in the checkpoint: " + _listing(missing))
  if mismatched:
    problems.append("shape mismatch: " + _listing(mismatched))
  if problems:
    origin = origin or f"config.init.checkpoint={init_config.checkpoint!r}"
    raise ConfigError(
      f"{origin}: " + "; ".join(problems)
      + f" (the checkpoint has {_listing(sorted(source), 4)})"
    )  # fmt: skip
  return loads, fresh


def to_global(value, sharding):
  """A host (numpy) array -> a global array with `sharding`, on any number of processes."""
  import jax

  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def continue_from(path: str, abstract_state) -> tuple[int, object, dict]:
  """(step, train state, report) of mode "continue": the checkpoint at `path` (a
  workdir, its checkpoints/ or checkpoints/STEP) restored whole onto abstract_state's
  shardings. A state of another shape (another model or optimizer) is one line."""
  from research import checkpoint

  directory, step = resolve_checkpoint(path)
  if not directory.is_dir():
    raise ConfigError(f"config.init.checkpoint={path!r}: no such directory")
  try:
    step, state = checkpoint.restore_state(directory, step, abstract_state)
  except FileNotFoundError as e:
    raise ConfigError(f"config.init.checkpoint={path!r}: {e}") from None
  except Exception as e:  # noqa: BLE001  Orbax/TensorStore raise many types
    # Orbax's first sentence ("Requested shape: (64, 10) is not compatible with the
    # stored shape: (128, 10)"), not its advice on how to pad or truncate arrays
    reason = checkpoint.first_line(e).split(". ")[0][:300]
    raise ConfigError(
      f"config.init.checkpoint={path!r}: its train state does not fit this config's "
      f"({reason}); config.init.mode='continue' needs the same model and optimizer"
    ) from None
  return step, state, {"checkpoint": str(directory), "step": step, "mode": "continue"}


def load_into(state, init_config, tx, state_sharding):
  """(state with the mapped arrays loaded and the optimizer state re-initialised
  from them, report). `state` is a fresh TrainState on the mesh."""
  import jax

  from research.sharding import path_name

  step, directory, source = read_source(init_config.checkpoint)
  variables = {"params": state.params, "model_state": state.model_state}
  flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
  names = [path_name(p) for p, _ in flat]
  shapes = {name: leaf.shape for name, (_, leaf) in zip(names, flat, strict=True)}
  loads, fresh = plan(shapes, source, init_config)

  leaves = [  # fresh arrays stay where they are; loaded ones take their sharding
    to_global(source[loads[name]].astype(leaf.dtype), leaf.sharding) if name in loads else leaf
    for name, (_, leaf) in zip(names, flat, strict=True)
  ]
  variables = jax.tree_util.tree_unflatten(treedef, leaves)
  opt_state = jax.jit(tx.init, out_shardings=state_sharding.opt_state)(variables["params"])
  state = state.replace(
    params=variables["params"], model_state=variables["model_state"], opt_state=opt_state
  )
  report = {
    "checkpoint": str(directory),
    "step": step,
    "loaded": len(loads),
    "fresh": fresh,
    "mode": init_config.mode,
  }
  return state, report
