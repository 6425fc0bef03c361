"""Layers whose parameters carry logical axis names, and activations by name.

Logical names used here: `embed` (input features of a dense layer), `mlp`
(hidden features), `classes` (classifier outputs), `conv_in` / `conv_out`
(convolution channels), and `batch` on activations. The sharding rules in the
config map them to mesh axes.

Parameters get their shardings from the rules directly (research.sharding).
Activations are pinned with `constrain` at layer outputs, as MaxText does, so
the partitioner never guesses a layout between layers; it is a no-op outside
the trainer's rules context (research.step.sharding_context). A mesh axis goes
to the first rule that claims it (`batch` first), so an activation's `embed`
stays unsharded where `batch` already uses `fsdp`.
"""

from __future__ import annotations

import functools
from typing import Any

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


def dense(features: int, axes: tuple[str, str], dtype, name: str | None = None):
  """A Dense layer with kernel axes `axes` and bias axis `axes[1]`.

  Returns x -> y with y constrained to (batch, ..., axes[1]); the parameters are
  those of nn.Dense under `name`.
  """
  layer = nn.Dense(
    features,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
    name=name,
  )

  def apply(x: jax.Array) -> jax.Array:
    y = layer(x)
    return constrain(y, ("batch",) + (None,) * (y.ndim - 2) + (axes[1],))

  return apply


class DropPath(nn.Module):
  """Stochastic depth (Huang et al. 2016): in training, zeroes a residual branch for
  a random `rate` of the examples and scales the rest by 1 / (1 - rate); the
  identity in evaluation. Draws from the "dropout" random stream."""

  rate: float

  @nn.compact
  def __call__(self, branch_Bx_: jax.Array, train: bool) -> jax.Array:
    if not train or self.rate == 0.0:
      return branch_Bx_
    keep = 1.0 - self.rate
    shape = (branch_Bx_.shape[0],) + (1,) * (branch_Bx_.ndim - 1)
    kept_Bx_ = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(kept_Bx_, branch_Bx_ / keep, 0.0).astype(branch_Bx_.dtype)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Pins the sharding of activation `x` by logical axis names (one per dimension)."""
  return nn.with_logical_constraint(x, axes)


def im2col(x_BxHxWxC: jax.Array, kernel_size: int, stride: int = 1) -> jax.Array:
  """(B, H, W, C) -> (B, H', W', k*k*C) patches, ordered (kernel col, kernel row, C);
  H' = (H - k) // stride + 1 (no padding here).

  One concatenation of the k*k shifted views: on XLA:CPU this and one matmul run
  ~3x faster forward+backward than lax.conv_general_dilated (measured for
  128x26x26x32 -> 64 channels, 3x3: 205 ms vs 555 ms), and the MNIST CNN's train
  step 7% faster than building it in two concatenations, rows then columns (62 vs
  67 ms: XLA copied the rows' concatenation once per column), whose patch order
  this keeps.
  """
  k, s = kernel_size, stride
  out_h, out_w = (x_BxHxWxC.shape[1] - k) // s + 1, (x_BxHxWxC.shape[2] - k) // s + 1
  rows = [slice(i, i + s * (out_h - 1) + 1, s) for i in range(k)]
  cols = [slice(j, j + s * (out_w - 1) + 1, s) for j in range(k)]
  return jnp.concatenate([x_BxHxWxC[:, r, c] for c in cols for r in rows], -1)


def _patches_matmul(x_BxHxWxC, kernel_KxKxCxF, stride: int):
  k, _, in_features, features = kernel_KxKxCxF.shape
  patches_BxHxWxP = im2col(x_BxHxWxC, k, stride)
  # Patches are ordered (kernel col j, kernel row i, C): match the kernel to it.
  kernel_PxF = kernel_KxKxCxF.transpose(1, 0, 2, 3).reshape(k * k * in_features, features)
  return patches_BxHxWxP @ kernel_PxF, patches_BxHxWxP


def _lax_conv(x_BxHxWxC, kernel_KxKxCxF, stride: int):
  return jax.lax.conv_general_dilated(
    x_BxHxWxC, kernel_KxKxCxF, (stride, stride), "VALID",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_valid(x_BxHxWxC, kernel_KxKxCxF, stride: int = 1):
  """VALID NHWC convolution, computed as im2col(x) @ kernel; its input gradient is XLA's
  transposed convolution, its kernel gradient patches^T @ dy.

  The default gradient of im2col + matmul would go back through the patches: a
  (B*H'*W', k*k*C) matrix (85 MB for the MNIST CNN's second convolution) written by
  dy @ kernel^T and summed back into the image. XLA's convolution kernel computes the
  input gradient without it: the CNN's train step runs 57 ms instead of 65 (2 cores).
  The forward stays im2col + matmul, faster there than XLA's convolution (17.7 vs
  21.3 ms for that layer), and its patches serve the kernel gradient.
  """
  return _patches_matmul(x_BxHxWxC, kernel_KxKxCxF, stride)[0]


def _conv_valid_fwd(x_BxHxWxC, kernel_KxKxCxF, stride):
  y_BxHxWxF, patches_BxHxWxP = _patches_matmul(x_BxHxWxC, kernel_KxKxCxF, stride)
  return y_BxHxWxF, (x_BxHxWxC, kernel_KxKxCxF, patches_BxHxWxP)


def _conv_valid_bwd(stride, residuals, dy_BxHxWxF):
  x_BxHxWxC, kernel_KxKxCxF, patches_BxHxWxP = residuals
  k, _, in_features, features = kernel_KxKxCxF.shape
  patches_NxP = patches_BxHxWxP.reshape(-1, patches_BxHxWxP.shape[-1])
  dkernel_PxF = patches_NxP.T @ dy_BxHxWxF.reshape(-1, features)
  dkernel = dkernel_PxF.reshape(k, k, in_features, features).transpose(1, 0, 2, 3)
  # Linear in x: only the transpose is computed (XLA drops the unused forward).
  _, transpose = jax.vjp(lambda x: _lax_conv(x, kernel_KxKxCxF, stride), x_BxHxWxC)
  (dx_BxHxWxC,) = transpose(dy_BxHxWxF)
  return dx_BxHxWxC, dkernel


conv_valid.defvjp(_conv_valid_fwd, _conv_valid_bwd)


# Up to this many rows, an embedding's gradient is a one-hot matmul instead of a scatter.
# The one-hot (tokens x rows, in the compute dtype) is then no larger than dy itself at
# widths >= 1,024; larger vocabularies spread the scatter's updates over more rows.
ONE_HOT_GRAD_MAX_VOCAB = 1024


@jax.custom_vjp
def take_rows(table_VxD: jax.Array, ids: jax.Array) -> jax.Array:
  """table[ids] (XLA's gather), whose table gradient is one_hot(ids)^T @ dy (a matmul,
  accumulated in float32) instead of XLA's scatter-add of dy into the table's rows.

  With few rows every row takes thousands of updates: on an H200 the GPT-2-shaped
  character LM's scatter (32,768 tokens into 65 rows, atomics contending for the same
  addresses) took 35 ms of a 77 ms step; the matmul is 2·V·D FLOPs per token (3.3
  GFLOP there, microseconds). The sum is also deterministic, which the scatter's
  atomics on a GPU are not.
  """
  return jnp.take(table_VxD, ids, axis=0)


def _take_rows_fwd(table_VxD, ids):
  return take_rows(table_VxD, ids), (table_VxD, ids)


def _take_rows_bwd(residuals, dy):
  table_VxD, ids = residuals
  one_hot_NxV = jax.nn.one_hot(ids.reshape(-1), table_VxD.shape[0], dtype=dy.dtype)
  dtable_VxD = jnp.einsum(
    "nv,nd->vd", one_hot_NxV, dy.reshape(-1, table_VxD.shape[1]),
    precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
  )  # fmt: skip
  return dtable_VxD.astype(table_VxD.dtype), None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


class Embed(nn.Embed):
  """nn.Embed (same parameters, same forward) whose lookup's gradient is a one-hot
  matmul (`take_rows`) for vocabularies of up to ONE_HOT_GRAD_MAX_VOCAB rows; larger
  ones keep XLA's scatter, whose updates spread over many rows and which costs less
  than the matmul's 2·V·D FLOPs per token."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if self.num_embeddings > ONE_HOT_GRAD_MAX_VOCAB:
      return super().__call__(inputs)
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError("Input type must be an integer or unsigned integer.")
    (table_VxD,) = self.promote_dtype(self.embedding, dtype=self.dtype, inexact=False)
    return take_rows(table_VxD, inputs)


class Conv(nn.Module):
  """NHWC convolution as im2col + matmul (conv_valid); parameters laid out as nn.Conv's.

  kernel: (k, k, C_in, C_out) with logical axes (None, None, conv_in, conv_out).
  """

  features: int
  kernel_size: int
  padding: str = "VALID"  # or "SAME" (TensorFlow's: output size ceil(input / stride))
  dtype: Any = jnp.float32
  strides: int = 1
  use_bias: bool = True

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    k, in_features = self.kernel_size, x_BxHxWxC.shape[-1]
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")
      ),
      (k, k, in_features, self.features),
      jnp.float32,
    )
    bias = jnp.zeros((self.features,), jnp.float32)
    if self.use_bias:
      bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        (self.features,),
        jnp.float32,
      )
    if self.padding == "SAME":
      pads = []
      for size in x_BxHxWxC.shape[1:3]:
        total = max((-(-size // self.strides) - 1) * self.strides + k - size, 0)
        pads.append((total // 2, total - total // 2))
      x_BxHxWxC = jnp.pad(x_BxHxWxC, ((0, 0), pads[0], pads[1], (0, 0)))
    elif self.padding != "VALID":
      raise ValueError(f"padding {self.padding!r}: valid: SAME, VALID")
    x_BxHxWxC, kernel, bias = nn.dtypes.promote_dtype(x_BxHxWxC, kernel, bias, dtype=self.dtype)
    y_BxHxWxF = conv_valid(x_BxHxWxC, kernel, self.strides)
    if self.use_bias:
      y_BxHxWxF = y_BxHxWxF + bias
    return constrain(y_BxHxWxF, ("batch", None, None, "conv_out"))


def conv(
  features: int, kernel_size: int, padding: str, dtype, name=None, strides=1, use_bias=True
) -> Conv:
  """An NHWC convolution (see Conv) with logical axis names on its parameters."""
  return Conv(features, kernel_size, padding, compute_dtype(dtype), strides, use_bias, name=name)


def compute_dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def flatten(x: jax.Array) -> jax.Array:
  return x.reshape((x.shape[0], -1))


def max_pool_2x2(x_BxHxWxC: jax.Array) -> jax.Array:
  """nn.max_pool(x, (2, 2), (2, 2)) (VALID: an odd last row or column is dropped) as a
  reshape and a max.

  Same forward values. The gradient differs from XLA's select-and-scatter only
  where a window holds tied maxima (it is split among them rather than given to
  one), e.g. a window of four ReLU zeros, whose gradient the ReLU then zeroes.
  Why: on the CPU, select-and-scatter (the backward of reduce_window max) took
  ~30% of the MNIST CNN's train step; this backward is elementwise (measured by
  research.bench: 80 ms -> 9 ms for a 128x24x24x64 input on 2 cores).
  """
  batch, height, width, channels = x_BxHxWxC.shape
  h2, w2 = height // 2, width // 2
  x = x_BxHxWxC[:, : 2 * h2, : 2 * w2, :]
  return x.reshape(batch, h2, 2, w2, 2, channels).max(axis=(2, 4))
