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
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


class Dense(nn.Dense):
  """nn.Dense (same parameters, same function) with the input's leading axes flattened
  into one for the matmul. XLA:CPU makes the kernel gradient of a (B, L, D) x (D, F)
  dot_general a matmul of two transposed copies, and of (B*L, D) x (D, F) one matmul of
  the arrays as they are: the Transformer LM's MLP block (8 x 256 x 768, 4x wide)
  forward and backward 278-290 -> 248-257 ms on the CPU (results/benchmarks.md)."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
    return y.reshape(*inputs.shape[:-1], y.shape[-1])


def contract(x: jax.Array, kernel: jax.Array, axes: int = 1) -> jax.Array:
  """x's last `axes` axes contracted with kernel's first `axes`, as one 2-D matmul of
  the flattened arrays (why: Dense): e.g. (B, L, D) x (D, H, K) -> (B, L, H, K), as
  einsum("bld,dhk->blhk"), or (B, L, H, K) x (H, K, D) -> (B, L, D). The einsum's kernel
  gradient copied x transposed, then transposed the (D, H, K) result; this one is a
  single matmul. The Transformer LM's attention layer (8 x 256 x 768, 12 heads, 4 query
  blocks) forward and backward 195.7 -> 184.1 ms on the CPU (median of 15 rounds)."""
  lead, inner = x.shape[: x.ndim - axes], math.prod(x.shape[x.ndim - axes :])
  y = x.reshape(-1, inner) @ kernel.reshape(inner, -1)
  return y.reshape(*lead, *kernel.shape[axes:])


def dense(features: int, axes: tuple[str, str], dtype, name: str | None = None):
  """A Dense layer with kernel axes `axes` and bias axis `axes[1]`.

  Returns x -> y with y constrained to (batch, ..., axes[1]); the parameters are
  those of nn.Dense under `name`.
  """
  layer = Dense(
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


def dropout_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> tuple[jax.Array, float]:
  """A dropout mask (True = kept) and the probability it keeps an element.

  Each element compares 8 random bits with a threshold, or 16 where 256 * rate
  is not a whole number, so one 32-bit random word serves four elements (or
  two). jax.random.bernoulli spends a threefry hash on every element (with
  jax_threefry_partitionable, JAX's default, even an 8-bit draw hashes once per
  element), and on the CPU those hashes were most of dropout's cost: the MNIST
  CNN's two masks took 3.1-3.4 ms with bernoulli and 1.2 ms this way, forward and
  backward (2 cores, session 19). The keep probability is 1 - rate exactly for
  rates that are multiples of 1/256 (0.25, 0.5, 0.125, ...); otherwise within
  1/131072 of it, and the caller scales by the probability returned, so the
  expectation is unchanged. The words are drawn over the leading axes and the
  packed last axis, so a batch-sharded input draws its mask shard by shard.
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate {rate}: valid: 0 <= rate < 1")
  bits = 8 if float(rate * 256).is_integer() else 16
  per_word = 32 // bits
  threshold = round((1.0 - rate) * (1 << bits))
  width = shape[-1] if shape else 1  # a scalar: one word, one field of it
  words = -(-width // per_word)
  words_Nx = jax.random.bits(key, shape[:-1] + (words,), jnp.uint32)
  shifts = jnp.arange(per_word, dtype=jnp.uint32) * bits
  fields = (words_Nx[..., None] >> shifts) & jnp.uint32((1 << bits) - 1)
  fields = fields.reshape(shape[:-1] + (words * per_word,))[..., :width].reshape(shape)
  return fields < threshold, threshold / (1 << bits)


class Dropout(nn.Module):
  """nn.Dropout (inverted dropout on the "dropout" random stream; the identity when
  deterministic) with masks from `dropout_mask`: four elements per random word."""

  rate: float
  deterministic: bool | None = None
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep, keep_prob = dropout_mask(self.make_rng(self.rng_collection), x.shape, self.rate)
    return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros((), x.dtype))


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Pins the sharding of activation `x` by logical axis names (one per dimension)."""
  return nn.with_logical_constraint(x, axes)


# Up to this many rows, an embedding's gradient is a one-hot matmul instead of a scatter.
# The one-hot (tokens x rows, in the compute dtype) is then no larger than dy itself at
# widths >= 1,024; above, its 2·V·D FLOPs per token grow with the table, and a sort
# (on a GPU) or XLA's scatter (elsewhere) takes the gradient: see embed_grad_method.
ONE_HOT_GRAD_MAX_VOCAB = 1024


def embed_grad_method(num_rows: int) -> str:
  """How an embedding of `num_rows` rows takes its gradient (see take_rows): a one-hot
  matmul up to ONE_HOT_GRAD_MAX_VOCAB rows; above, on a GPU, a sort and a segmented sum
  (PyTorch's embedding backward also sorts), elsewhere XLA's scatter-add, which the
  CPU runs as one sequential loop.

  A GPU's scatter-add is atomics, which contend when many tokens share a row: the
  GPT-2-shaped character LM's 32,768 tokens into 65 rows took 35 ms of a 77 ms step on
  an H200. The contention depends on the data, not on the table: the same 65 characters
  in GPT-2's 50,304-row table (`shakespeare_char.py:size=gpt2_124m`) hit the same rows.
  """
  if num_rows <= ONE_HOT_GRAD_MAX_VOCAB:
    return "one_hot"
  return "sorted" if jax.default_backend() == "gpu" else "scatter"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def take_rows(table_VxD: jax.Array, ids: jax.Array, method: str = "one_hot") -> jax.Array:
  """table[ids] (XLA's gather), whose table gradient is computed without XLA's
  scatter-add of dy into the table's rows, by `method`:

  - "one_hot": one_hot(ids)^T @ dy, a matmul accumulated in float32: 2·V·D FLOPs per
    token (3.3 GFLOP for the 65-row character LM's step, microseconds);
  - "sorted": the ids sorted, dy's rows in that order summed within each run of one id
    (a segmented scan, in float32), each present row's sum read at its run's end: no
    atomics, O(tokens x D) work whatever the vocabulary. On a sharded batch the sort
    gathers the ids and dy onto each device.

  Both sums are deterministic, which the scatter's atomics on a GPU are not.
  """
  if method not in ("one_hot", "sorted"):
    raise ValueError(f"take_rows method {method!r}: valid: one_hot, sorted")
  return jnp.take(table_VxD, ids, axis=0)


def _take_rows_fwd(table_VxD, ids, method):
  return take_rows(table_VxD, ids, method), (table_VxD, ids)


def _take_rows_bwd(method, residuals, dy):
  table_VxD, ids = residuals
  rows, width = table_VxD.shape
  ids_N, dy_NxD = ids.reshape(-1), dy.reshape(-1, width)
  if method == "sorted":
    return sorted_segment_sum(ids_N, dy_NxD, rows).astype(table_VxD.dtype), None
  one_hot_NxV = jax.nn.one_hot(ids_N, rows, dtype=dy.dtype)
  dtable_VxD = jnp.einsum(
    "nv,nd->vd", one_hot_NxV, dy_NxD,
    precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
  )  # fmt: skip
  return dtable_VxD.astype(table_VxD.dtype), None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def sorted_segment_sum(ids_N: jax.Array, values_NxD: jax.Array, num_rows: int) -> jax.Array:
  """(num_rows, D) float32: row v is the sum of values_NxD's rows whose id is v (ids
  outside [0, num_rows) are dropped), by a sort and a segmented scan: no scatter."""
  order_N = jnp.argsort(ids_N)
  sorted_N = ids_N[order_N]
  sorted_NxD = values_NxD[order_N].astype(jnp.float32)
  starts_N = jnp.concatenate([jnp.ones((1,), bool), sorted_N[1:] != sorted_N[:-1]])

  def add_within_runs(a, b):  # associative: a run's start stops the sum from the left
    (start_a, sum_a), (start_b, sum_b) = a, b
    return start_a | start_b, jnp.where(start_b[:, None], sum_b, sum_a + sum_b)

  _, sums_NxD = jax.lax.associative_scan(add_within_runs, (starts_N, sorted_NxD))
  rows_V = jnp.arange(num_rows, dtype=sorted_N.dtype)
  last_V = jnp.maximum(jnp.searchsorted(sorted_N, rows_V, side="right") - 1, 0)  # runs' ends
  present_V = sorted_N[last_V] == rows_V
  return jnp.where(present_V[:, None], sums_NxD[last_V], 0.0)


class Embed(nn.Embed):
  """nn.Embed (same parameters, same forward) whose lookup's gradient avoids XLA's
  scatter-add where it is slow (`embed_grad_method`: a one-hot matmul for small
  vocabularies, a sort on a GPU for large ones); elsewhere nn.Embed's own."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    method = embed_grad_method(self.num_embeddings)
    if method == "scatter":
      return super().__call__(inputs)
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError("Input type must be an integer or unsigned integer.")
    (table_VxD,) = self.promote_dtype(self.embedding, dtype=self.dtype, inexact=False)
    return take_rows(table_VxD, inputs, method)


# backend -> input channel counts whose convolution Conv computes as patches @ kernel
# (conv_as_matmul). On the CPU, one channel (a grayscale image's first layer): XLA's
# convolution of a 1-channel input vectorises poorly, and its kernel gradient
# transposes the output's gradient (B, H, W, F) to (H, W, B, F) first. Forward and
# kernel gradient of a ReLU layer, batch 128, 2-core Zen 4: 28x28x1 -> 32, 3x3: 5.0 ->
# 3.5 ms (forward alone 2.6 -> 1.9); -> 64: 7.9 -> 7.1; 5x5 SAME -> 6 (LeNet-5): 6.5 ->
# 5.7. Three channels were mixed (32x32x3 -> 16: 8.3 -> 7.4; -> 64: 16.7 -> 19.8),
# so they keep XLA's convolution.
PATCH_CONV_IN_FEATURES = {"cpu": (1,)}


def conv_as_matmul(x_BxHxWxC: jax.Array, kernel: jax.Array, strides: int, padding: str):
  """lax.conv_general_dilated(x, kernel, (s, s), padding) in NHWC/HWIO as one matmul:
  the k*k shifted (strided) views of x concatenated along the channels, in the
  kernel's (kh, kw, c) order, times the kernel reshaped to (k*k*C, F). Its kernel
  gradient is a matmul over the patches as they are laid out (no transposes); the
  patches are k*k times the input, hence only for inputs with few channels."""
  batch, height, width, channels = x_BxHxWxC.shape
  k, _, _, features = kernel.shape
  pads = jax.lax.padtype_to_pads((height, width), (k, k), (strides, strides), padding)
  x_BxHxWxC = jnp.pad(x_BxHxWxC, ((0, 0), *pads, (0, 0)))
  out_h, out_w = ((size - k) // strides + 1 for size in x_BxHxWxC.shape[1:3])
  rows, cols = (out_h - 1) * strides + 1, (out_w - 1) * strides + 1
  views = [
    x_BxHxWxC[:, i : i + rows : strides, j : j + cols : strides, :]
    for i in range(k)
    for j in range(k)
  ]
  patches_NxP = jnp.concatenate(views, axis=-1).reshape(batch * out_h * out_w, k * k * channels)
  y_NxF = patches_NxP @ kernel.reshape(k * k * channels, features)
  return y_NxF.reshape(batch, out_h, out_w, features)


class Conv(nn.Module):
  """NHWC convolution (XLA's, `lax.conv_general_dilated`); parameters laid out as
  nn.Conv's, so checkpoints load into either.

  kernel: (k, k, C_in, C_out) with logical axes (None, None, conv_in, conv_out).

  On the CPU this is fast with XLA's own convolution kernels, which
  `research.runtime.CPU_FLAGS` selects over YNNPACK's (jaxlib 0.10's default for a
  forward convolution); with them it beats the im2col + matmul form this layer had
  until session 16 (figures in research.runtime's docstring), except on a one-channel
  input, which takes that form (conv_as_matmul; PATCH_CONV_IN_FEATURES).
  """

  features: int
  kernel_size: int
  padding: str = "VALID"  # or "SAME" (TensorFlow's: output size ceil(input / stride))
  dtype: Any = jnp.float32
  strides: int = 1
  use_bias: bool = True

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    if self.padding not in ("SAME", "VALID"):
      raise ValueError(f"padding {self.padding!r}: valid: SAME, VALID")
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
    x_BxHxWxC, kernel, bias = nn.dtypes.promote_dtype(x_BxHxWxC, kernel, bias, dtype=self.dtype)
    if in_features in PATCH_CONV_IN_FEATURES.get(jax.default_backend(), ()):
      y_BxHxWxF = conv_as_matmul(x_BxHxWxC, kernel, self.strides, self.padding)
    else:
      y_BxHxWxF = jax.lax.conv_general_dilated(
        x_BxHxWxC, kernel, (self.strides, self.strides), self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )  # fmt: skip
    if self.use_bias:
      y_BxHxWxF = y_BxHxWxF + bias
    return constrain(y_BxHxWxF, ("batch", None, None, "conv_out"))


def conv(
  features: int, kernel_size: int, padding: str, dtype, name=None, strides=1, use_bias=True
) -> Conv:
  """An NHWC convolution (see Conv) with logical axis names on its parameters."""
  return Conv(features, kernel_size, padding, compute_dtype(dtype), strides, use_bias, name=name)


REMAT_POLICIES = ("none", "full", "minimal")


@functools.cache
def remat(module_class, policy: str, static_argnums: tuple[int, ...] = (), train: bool = True):
  """`module_class` with its activations recomputed in the backward pass instead of kept
  (jax.checkpoint; MaxText's `remat_policy`), parameters and names unchanged.

  "none": the class itself; "full": keeps only the module's inputs; "minimal": also
  keeps the outputs of its matmuls without batch dimensions (the projections; the
  attention's batched matmuls, softmax and activations are recomputed).
  `static_argnums`: the call's Python arguments (`self` is 0). `train=False` (no
  gradient, so nothing to recompute): the class itself, the policy still checked.
  """
  if policy not in REMAT_POLICIES:
    raise ValueError(f"model.remat={policy!r}: valid: {', '.join(REMAT_POLICIES)}")
  if policy == "none" or not train:
    return module_class
  saveable = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return nn.remat(
    module_class, static_argnums=static_argnums, policy=saveable if policy == "minimal" else None
  )


def compute_dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def flatten(x: jax.Array) -> jax.Array:
  return x.reshape((x.shape[0], -1))


def max_pool_2x2(x_BxHxWxC: jax.Array) -> jax.Array:
  """nn.max_pool(x, (2, 2), (2, 2)) (VALID: an odd last row or column is dropped) as a
  reshape and a max, with nn.max_pool's gradient: each window's gradient goes to its
  first maximum in row-major order, as XLA's select-and-scatter gives it.

  Why: on the CPU, select-and-scatter (the backward of reduce_window max) took ~30% of
  the MNIST CNN's train step; this backward is elementwise (80 ms -> 9 ms for a
  128x24x24x64 input on 2 cores). The reshape's own autodiff backward split a tied
  gradient among the maxima: it counted them (a reduction) and divided, and XLA:CPU ran
  that count as a YNNPACK reduction fed a materialised broadcast of the next dropout's
  scale. ReLU, this pool and dropout, forward and backward on that input: 11.6-15.4 ->
  5.9-7.9 ms; in the bench CNN's ~85 ms step ~1-2 ms of per-thread op time, less than
  alternating runs of the step resolve.

  Since session 25 the forward also keeps, per window, the position of its first
  maximum (int8, a reduction), and the backward only compares it with each position:
  before, the backward compared every position with the maximum again, in one loop
  over the input whose four-way stacking XLA:CPU emits as a branch per element (7.9 ms
  of a 92 ms CNN step, on one thread). The same ReLU, pool and dropout, forward and
  backward: 10.5 -> 5.7 ms (best of 9); the bench CNN's train step, both forms
  alternating in one process: 86.3 -> 82.9 ms (median of 20 rounds, 18 faster).
  """
  height, width = x_BxHxWxC.shape[1:3]
  return _max_pool_2x2(x_BxHxWxC[:, : height // 2 * 2, : width // 2 * 2, :])


def _windows(x_BxHxWxC: jax.Array) -> jax.Array:
  batch, height, width, channels = x_BxHxWxC.shape
  return x_BxHxWxC.reshape(batch, height // 2, 2, width // 2, 2, channels)


@jax.custom_vjp
def _max_pool_2x2(x_BxHxWxC: jax.Array) -> jax.Array:
  return _windows(x_BxHxWxC).max(axis=(2, 4))


# A 2x2 window's positions in row-major order, laid out as _windows' (B, h, 2, w, 2, C).
_WINDOW_POSITIONS = np.arange(4, dtype=np.int8).reshape(1, 1, 2, 1, 2, 1)


def _max_pool_2x2_fwd(x_BxHxWxC):
  """The maximum of each window, and the position (0-3) of its first maximum."""
  x = _windows(x_BxHxWxC)
  y_BxhxwxC = x.max(axis=(2, 4))
  at_max = x == y_BxhxwxC[:, :, None, :, None, :]
  first_BxhxwxC = jnp.where(at_max, _WINDOW_POSITIONS, np.int8(4)).min(axis=(2, 4))
  return y_BxhxwxC, first_BxhxwxC


def _max_pool_2x2_bwd(first_BxhxwxC, dy_BxhxwxC):
  """Elementwise: each input position takes its window's gradient where it is the
  window's first maximum, else zero (a window whose maximum is NaN gives none)."""
  batch, height, width, channels = dy_BxhxwxC.shape
  taken = first_BxhxwxC[:, :, None, :, None, :] == _WINDOW_POSITIONS
  dx = jnp.where(taken, dy_BxhxwxC[:, :, None, :, None, :], jnp.zeros((), dy_BxhxwxC.dtype))
  return (dx.reshape(batch, 2 * height, 2 * width, channels),)


_max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)
