"""Logical axis rules -> shardings of the train state, validated, and the sharding table.

Every model parameter carries logical axis names (`embed`, `mlp`, `conv_out`,
...). `config.sharding_rules` maps each logical name to a tuple of mesh axes
(`()` replicates). The optimizer state inherits its parameter's names, so FSDP
shards it with the parameters. Anything unusable is a loud error naming the
parameter: a logical name with no rule, a mesh axis that does not divide the
dimension, or one mesh axis used for two dimensions of a parameter.
"""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from research.config import MESH_AXES, ConfigError


def path_name(path) -> str:
  """'params/conv1/kernel' from a pytree path (dict keys, dataclass fields, indices)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def mesh_spec(name: str, shape, logical: PartitionSpec, rules, mesh: Mesh) -> PartitionSpec:
  """The mesh PartitionSpec for one array with logical axes `logical`."""
  logical = tuple(logical) + (None,) * (len(shape) - len(tuple(logical)))
  used: dict[str, str] = {}
  spec = []
  for dim, (size, logical_name) in enumerate(zip(shape, logical, strict=True)):
    if logical_name is None or size == 1:  # (1: e.g. Adafactor's placeholder moments)
      spec.append(None)
      continue
    if logical_name not in rules:
      raise ConfigError(
        f"{name}: logical axis {logical_name!r} has no rule in config.sharding_rules "
        f"(rules for: {', '.join(sorted(rules))})"
      )
    axes = tuple(rules[logical_name])
    for axis in axes:
      if axis not in MESH_AXES:
        raise ConfigError(
          f"config.sharding_rules.{logical_name}: unknown mesh axis {axis!r}; "
          f"valid: {', '.join(MESH_AXES)}"
        )
      if axis in used:
        raise ConfigError(
          f"{name}: conflicting rules: mesh axis {axis!r} shards both {used[axis]!r} and "
          f"{logical_name!r} (shape {tuple(shape)})"
        )
      used[axis] = logical_name
    ways = math.prod(mesh.shape[axis] for axis in axes)
    if size % ways:
      raise ConfigError(
        f"{name}: dimension {dim} ({logical_name!r}, size {size}) is not divisible by "
        f"{ways} (mesh axes {axes}); shape {tuple(shape)}"
      )
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec)


def state_shardings(boxed_state_shape, mesh: Mesh, rules) -> tuple:
  """(unboxed abstract state, NamedSharding tree, table rows) from an eval_shape'd boxed state."""
  rules = {k: tuple(v) for k, v in dict(rules).items()}
  logical_specs = nn.get_partition_spec(boxed_state_shape)
  state_shape = nn.meta.unbox(boxed_state_shape)
  rows = []

  def one(path, logical, leaf):
    name = path_name(path)
    if len(tuple(logical)) > leaf.ndim:  # a statistic reduced from a parameter (Adafactor's
      logical = PartitionSpec()  # factored moments: a vector per row or column): replicated
    sharding = NamedSharding(mesh, mesh_spec(name, leaf.shape, logical, rules, mesh))
    rows.append(
      {
        "name": name,
        "shape": tuple(leaf.shape),
        "logical": tuple(logical),
        "mesh": tuple(sharding.spec),
        "bytes_per_device": int(np.prod(sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize,
      }
    )
    return sharding

  shardings = jax.tree_util.tree_map_with_path(
    one, logical_specs, state_shape, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )
  return state_shape, shardings, rows


@contextlib.contextmanager
def activation_context(mesh: Mesh, rules):
  """While tracing a step: the rules and mesh that `layers.constrain` pins activations by.

  Flax gives each mesh axis to the first rule that claims it, so `batch` goes
  first: an activation's feature axis never takes the mesh axes of the batch.
  """
  rules = {k: tuple(v) for k, v in dict(rules).items()}
  ordered = [("batch", rules.pop("batch", ()))] + sorted(rules.items())
  flax_rules = tuple((name, axes or None) for name, axes in ordered)
  with nn.logical_axis_rules(flax_rules), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    yield


def table(rows) -> str:
  """Markdown: one row per parameter, then the totals per device."""
  params = [r for r in rows if r["name"].startswith("params/")]
  optimizer = [r for r in rows if r["name"].startswith("opt_state/")]
  fmt = lambda axes: "(" + ", ".join("-" if a is None else str(a) for a in axes) + ")"
  lines = [
    "| parameter | shape | logical axes | mesh sharding | bytes/device |",
    "|---|---|---|---|---|",
  ]
  for r in params:
    lines.append(
      f"| {r['name'].removeprefix('params/')} | {r['shape']} | {fmt(r['logical'])} | "
      f"{fmt(r['mesh'])} | {r['bytes_per_device']:,} |"
    )
  total = lambda rs: sum(r["bytes_per_device"] for r in rs)
  lines.append("")
  lines.append(f"parameters: {total(params):,} bytes per device")
  lines.append(f"optimizer state: {total(optimizer):,} bytes per device")
  return "\n".join(lines)
