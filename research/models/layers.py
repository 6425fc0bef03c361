"""Layers whose parameters carry logical axis names, and activations by name.

Logical names used here: `embed` (input features of a dense layer), `mlp`
(hidden features), `classes` (classifier outputs), `conv_in` / `conv_out`
(convolution channels). The sharding rules in the config map them to mesh axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "silu": nn.silu,
    "elu": nn.elu,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; valid: {', '.join(sorted(ACTIVATIONS))}")
  return ACTIVATIONS[name]


def dense(features: int, axes: tuple[str, str], dtype, name: str | None = None) -> nn.Dense:
  """A Dense layer with kernel axes `axes` and bias axis `axes[1]`."""
  return nn.Dense(
      features,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
      name=name,
  )


def conv(features: int, kernel_size: int, padding: str, dtype, name: str | None = None) -> nn.Conv:
  """An NHWC convolution with kernel axes (height, width, conv_in, conv_out)."""
  return nn.Conv(
      features,
      (kernel_size, kernel_size),
      padding=padding,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")
      ),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
      name=name,
  )


def compute_dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def flatten(x: jax.Array) -> jax.Array:
  return x.reshape((x.shape[0], -1))
