"""Decoder-only Transformer language model (GPT-2 / nanoGPT style), pre-norm.

Shapes: B batch, L length, D model width (embed), H heads, K head width (kv),
F MLP width (mlp), V vocabulary.

Every parameter carries logical axes (`vocab`, `embed`, `heads`, `kv`, `mlp`),
so the config's sharding rules give FSDP (embed over fsdp) and Megatron tensor
parallelism (heads and mlp over model: column-parallel in, row-parallel out).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging
from flax import linen as nn

from research import registry
from research.models import layers

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rotary")
ATTENTION_IMPLS = ("einsum", "auto", "xla", "cudnn")  # einsum: ours; others: jax.nn's fused
# Causal self-attention's queries in this many blocks per backend, each block against
# the keys up to its own end only: 10 of 16 query-key blocks computed for 4 blocks.
# On the CPU (results/benchmarks.md), attention forward and backward per layer, 8 x 256
# tokens, 12 heads of 64: 68-77 -> 41 ms (PyTorch's flash attention: 40-43; 2 or 8
# blocks were slower than 4); 24 x 128, 6 heads of 32: 18.2 -> 10.5 ms; 12 x 64:
# 2.2 -> 1.6 ms. Not measured on GPUs, where one batched matmul each way stays.
CAUSAL_QUERY_BLOCKS = {"cpu": 4}
MIN_QUERY_BLOCK = 16


def causal_query_blocks(length: int) -> int:
  """How many query blocks causal self-attention over `length` tokens is split into
  on this backend (1: not split)."""
  blocks = CAUSAL_QUERY_BLOCKS.get(jax.default_backend(), 1)
  return blocks if length % blocks == 0 and length // blocks >= MIN_QUERY_BLOCK else 1


def _init(stddev: float, axes):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


def _norm(kind: str, name: str) -> nn.Module:
  scale = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
  if kind == "rmsnorm":
    return nn.RMSNorm(epsilon=1e-5, dtype=jnp.float32, scale_init=scale, name=name)
  return nn.LayerNorm(
    epsilon=1e-5,
    dtype=jnp.float32,
    use_bias=False,  # nanoGPT's bias=False
    scale_init=scale,
    name=name,
  )


def rotary(x_BxLxHxK: jax.Array, positions_L: jax.Array) -> jax.Array:
  """Rotary position embedding (Su et al. 2021) on pairs (i, i + K/2) of each head."""
  half = x_BxLxHxK.shape[-1] // 2
  frequencies_K2 = 1.0 / (10_000 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles_Lx1xK2 = (positions_L[:, None].astype(jnp.float32) * frequencies_K2)[:, None, :]
  sin, cos = jnp.sin(angles_Lx1xK2), jnp.cos(angles_Lx1xK2)
  x1, x2 = x_BxLxHxK[..., :half].astype(jnp.float32), x_BxLxHxK[..., half:].astype(jnp.float32)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxLxHxK.dtype)


_fallbacks_logged = set()


def fused_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, causal: bool, implementation: str):
  """jax.nn.dot_product_attention with `implementation` "xla", "cudnn" or "auto".

  "auto" asks for cuDNN's flash attention (no L x L matrix in memory, causal blocks
  skipped) on a GPU in bf16 or fp16, and takes XLA's own where cuDNN refuses (no
  cuDNN, an older GPU, a head width it lacks: it says so while tracing) or elsewhere.
  jax.nn's own default (implementation=None) is XLA's everywhere as of jax 0.11: on an
  H200 the GPT-2-shaped LM ran with L x L logits in float32 under it.
  """

  def attend(impl):
    return jax.nn.dot_product_attention(
      q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, is_causal=causal, implementation=impl
    )

  if implementation != "auto":
    return attend(implementation)
  half = q_BxLxHxK.dtype in (jnp.bfloat16, jnp.float16)
  if half and jax.default_backend() == "gpu":
    try:
      return attend("cudnn")
    except (NotImplementedError, RuntimeError, ValueError) as refused:
      reason = f"{type(refused).__name__}: {str(refused).splitlines()[0][:200]}"
      if reason not in _fallbacks_logged:
        _fallbacks_logged.add(reason)
        logging.warning("model.attention='auto': cuDNN attention refused (%s); XLA's", reason)
  return attend("xla")


class Attention(nn.Module):
  """Multi-head dot-product attention: causal self-attention (decoders), full
  self-attention (encoders, `causal=False`) or cross-attention (`context` given:
  keys and values from the encoder; `mask_BxS` marks its real tokens)."""

  num_heads: int
  head_dim: int
  positions: str
  dropout: float
  out_stddev: float
  dtype: jnp.dtype
  max_len: int
  causal: bool = True
  qkv_stddev: float = 0.02  # GPT-2's; encoder-decoders use width**-0.5 (see seq2seq)
  implementation: str = "einsum"  # or a jax.nn.dot_product_attention one (ATTENTION_IMPLS)

  @nn.compact
  def __call__(
    self,
    x_BxLxD: jax.Array,
    positions_L: jax.Array,
    train: bool,
    decode: bool = False,
    context_BxSxD: jax.Array | None = None,
    mask_BxS: jax.Array | None = None,
  ) -> jax.Array:
    width = x_BxLxD.shape[-1]
    shape_DxHxK = (width, self.num_heads, self.head_dim)

    def project(name, source):
      kernel_DxHxK = self.param(name, _init(self.qkv_stddev, ("embed", "heads", "kv")), shape_DxHxK)
      return layers.contract(source, kernel_DxHxK.astype(self.dtype))  # bld,dhk->blhk

    source = x_BxLxD if context_BxSxD is None else context_BxSxD
    q_BxLxHxK, k_BxSxHxK, v_BxSxHxK = (
      project("query", x_BxLxD), project("key", source), project("value", source)
    )  # fmt: skip
    if self.positions == "rotary" and context_BxSxD is None:
      q_BxLxHxK, k_BxSxHxK = rotary(q_BxLxHxK, positions_L), rotary(k_BxSxHxK, positions_L)
    q_BxLxHxK = layers.constrain(q_BxLxHxK, ("batch", None, "heads", "kv"))
    fused = self.implementation != "einsum" and not decode and context_BxSxD is None
    if fused and mask_BxS is None:
      return self._fused(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, train, width)
    self_causal = self.causal and context_BxSxD is None
    length = q_BxLxHxK.shape[1]
    blocks = causal_query_blocks(length) if self_causal and not decode and mask_BxS is None else 1
    if blocks > 1:  # block i's queries see keys [0, end of block i) only (positions ascend)
      size = length // blocks
      # Heads first once (B x H x L x K), not once per block: XLA's batched matmuls want
      # the batch axes leading, and a slice per block would transpose each anew.
      q_BxHxLxK, k_BxHxSxK, v_BxHxSxK = (
        jnp.swapaxes(t, 1, 2) for t in (q_BxLxHxK, k_BxSxHxK, v_BxSxHxK)
      )  # fmt: skip
      parts = []
      for i in range(blocks):
        block, seen = slice(i * size, (i + 1) * size), slice(0, (i + 1) * size)
        q, k, v = q_BxHxLxK[:, :, block], k_BxHxSxK[:, :, seen], v_BxHxSxK[:, :, seen]
        seen_by = (positions_L[block], positions_L[seen], True, None, train)
        parts.append(self._attend(q, k, v, *seen_by, heads_first=True))
      y_BxHxLxK = jnp.concatenate(parts, axis=2)
      return self._project_out(jnp.swapaxes(y_BxHxLxK, 1, 2), width)
    key_positions_S = positions_L
    if decode and context_BxSxD is None:  # earlier calls' keys and values: the "cache"
      k_BxSxHxK, v_BxSxHxK, key_positions_S = self._cached(k_BxSxHxK, v_BxSxHxK, positions_L)
    y_BxLxHxK = self._attend(
      q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, positions_L, key_positions_S, self_causal, mask_BxS, train
    )
    return self._project_out(y_BxLxHxK, width)

  def _attend(self, q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, positions_L, key_positions_S, causal,
              mask_BxS, train, heads_first=False):  # fmt: skip
    """softmax(q k^T / sqrt(K)) v over the keys each query sees: those at positions up to
    its own if `causal`, and those `mask_BxS` marks. `heads_first`: q, k, v and the result
    are B x H x L x K."""
    qk, pv = ("bhqk,bhsk", "bhqs,bhsk->bhqk") if heads_first else ("bqhk,bshk", "bhqs,bshk->bqhk")
    logits_BxHxLxS = jnp.einsum(qk + "->bhqs", q_BxLxHxK, k_BxSxHxK).astype(jnp.float32)
    logits_BxHxLxS = logits_BxHxLxS / jnp.sqrt(self.head_dim).astype(jnp.float32)
    visible_BxHxLxS = jnp.ones((1, 1, 1, 1), bool)
    if causal:
      visible_BxHxLxS = (positions_L[:, None] >= key_positions_S[None, :])[None, None]
    if mask_BxS is not None:
      visible_BxHxLxS = visible_BxHxLxS & mask_BxS[:, None, None, :]
    logits_BxHxLxS = jnp.where(visible_BxHxLxS, logits_BxHxLxS, jnp.finfo(jnp.float32).min)
    weights_BxHxLxS = jax.nn.softmax(logits_BxHxLxS, axis=-1).astype(self.dtype)
    weights_BxHxLxS = layers.Dropout(self.dropout, deterministic=not train)(weights_BxHxLxS)
    return jnp.einsum(pv, weights_BxHxLxS, v_BxSxHxK)

  def _project_out(self, y_BxLxHxK, width):
    out_HxKxD = self.param(
      "out",
      _init(self.out_stddev, ("heads", "kv", "embed")),
      (self.num_heads, self.head_dim, width),
    )
    y_BxLxD = layers.contract(y_BxLxHxK, out_HxKxD.astype(self.dtype), axes=2)  # blhk,hkd->bld
    return layers.constrain(y_BxLxD, ("batch", None, "embed"))

  def _fused(self, q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, train, width):
    """jax.nn.dot_product_attention (see fused_attention). No dropout on the weights."""
    if train and self.dropout > 0:
      raise ValueError(
        f"model.attention={self.implementation!r} has no attention dropout: "
        f"set model.dropout=0 or model.attention='einsum'"
      )
    y_BxLxHxK = fused_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, self.causal, self.implementation)
    return self._project_out(y_BxLxHxK, width)

  def _cached(self, k_BxLxHxK, v_BxLxHxK, positions_L):
    """Writes this call's keys and values at positions_L; returns all max_len of them.

    Slots not written yet hold zeros at positions >= every query's, so the causal
    mask hides them.
    """
    batch, _, heads, head_dim = k_BxLxHxK.shape
    shape_BxSxHxK = (batch, self.max_len, heads, head_dim)
    cached_k = self.variable("cache", "key", jnp.zeros, shape_BxSxHxK, k_BxLxHxK.dtype)
    cached_v = self.variable("cache", "value", jnp.zeros, shape_BxSxHxK, v_BxLxHxK.dtype)
    start = (0, positions_L[0], 0, 0)
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_BxLxHxK, start)
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_BxLxHxK, start)
    return cached_k.value, cached_v.value, jnp.arange(self.max_len)


class MLPBlock(nn.Module):
  hidden: int
  out_stddev: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    width = x_BxLxD.shape[-1]
    h_BxLxF = layers.Dense(
      self.hidden, use_bias=False, dtype=self.dtype, kernel_init=_init(0.02, ("embed", "mlp")),
      name="fc_in",
    )(x_BxLxD)  # fmt: skip
    h_BxLxF = layers.constrain(nn.gelu(h_BxLxF), ("batch", None, "mlp"))
    y_BxLxD = layers.Dense(
      width, use_bias=False, dtype=self.dtype,
      kernel_init=_init(self.out_stddev, ("mlp", "embed")), name="fc_out",
    )(h_BxLxF)  # fmt: skip
    return layers.constrain(y_BxLxD, ("batch", None, "embed"))


@registry.models.register("transformer_lm")
class TransformerLM(nn.Module):
  """Token ids (B, L) -> next-token logits (B, L, V).

  nanoGPT's choices by default: pre-LayerNorm without biases, learned
  positions, GELU MLP of 4x width, tied input/output embeddings, N(0, 0.02)
  initialisation with residual projections scaled by 1/sqrt(2 * num_layers).

  `pad_vocab_to`: rows of the embedding (and logits) when more than the data's
  `vocab_size`, as nanoGPT pads GPT-2's 50,257 tokens to 50,304; the extra rows are
  never a target (decoding never picks them).
  """

  vocab_size: int
  num_layers: int = 4
  num_heads: int = 4
  embed_dim: int = 128
  mlp_ratio: int = 4
  max_len: int = 256
  positions: str = "learned"  # or "rotary"
  norm: str = "layernorm"  # or "rmsnorm"
  dropout: float = 0.0
  tied_embeddings: bool = True
  attention: str = "einsum"  # "auto", "xla" or "cudnn": jax.nn.dot_product_attention
  pad_vocab_to: int = 0
  remat: str = "none"  # "full" or "minimal": recompute activations in backward (layers.remat)
  dtype: str = "float32"

  @property
  def rows(self) -> int:
    """Rows of the embedding and of the logits: vocab_size, or pad_vocab_to if more."""
    return max(self.vocab_size, self.pad_vocab_to)

  @nn.compact
  def __call__(
    self, tokens_BxL: jax.Array, *, train: bool = False, decode: bool = False
  ) -> jax.Array:
    """`decode=True` continues from the tokens of earlier decode calls (the "cache"
    collection: keys, values and the next position; see research.decoding)."""
    if self.positions not in POSITIONS or self.norm not in NORMS:
      raise ValueError(
        f"model.positions={self.positions!r} (valid: {', '.join(POSITIONS)}), "
        f"model.norm={self.norm!r} (valid: {', '.join(NORMS)})"
      )
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"model.attention={self.attention!r}: valid: {', '.join(ATTENTION_IMPLS)}")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"model.embed_dim={self.embed_dim} is not divisible by num_heads")
    length = tokens_BxL.shape[1]
    if length > self.max_len:
      raise ValueError(f"sequence length {length} > model.max_len={self.max_len}")
    dtype = layers.compute_dtype(self.dtype)
    out_stddev = 0.02 / (2 * self.num_layers) ** 0.5
    embedding = layers.Embed(
      self.rows, self.embed_dim, dtype=dtype,
      embedding_init=_init(0.02, ("vocab", "embed")), name="embedding",
    )  # fmt: skip
    x_BxLxD = embedding(tokens_BxL)
    positions_L = jnp.arange(length)
    if decode:
      next_position = self.variable("cache", "next_position", jnp.zeros, (), jnp.int32)
      positions_L = positions_L + next_position.value
      next_position.value = next_position.value + length
    if self.positions == "learned":
      table_LxD = self.param(
        "position_embedding", _init(0.02, (None, "embed")), (self.max_len, self.embed_dim)
      )
      x_BxLxD = x_BxLxD + jnp.take(table_LxD, positions_L, axis=0).astype(dtype)
    x_BxLxD = layers.Dropout(self.dropout, deterministic=not train)(x_BxLxD)
    x_BxLxD = layers.constrain(x_BxLxD, ("batch", None, "embed"))
    training = train and not decode  # only a gradient needs the recomputation
    attention = layers.remat(Attention, self.remat, (3, 4), training)  # (train, decode)
    mlp = layers.remat(MLPBlock, self.remat, train=training)
    for i in range(self.num_layers):
      h_BxLxD = _norm(self.norm, f"block_{i}_norm_1")(x_BxLxD).astype(dtype)
      h_BxLxD = attention(
        self.num_heads, self.embed_dim // self.num_heads, self.positions, self.dropout,
        out_stddev, dtype, self.max_len, implementation=self.attention, name=f"block_{i}_attention",
      )(h_BxLxD, positions_L, train, decode)  # fmt: skip
      x_BxLxD = x_BxLxD + layers.Dropout(self.dropout, deterministic=not train)(h_BxLxD)
      h_BxLxD = _norm(self.norm, f"block_{i}_norm_2")(x_BxLxD).astype(dtype)
      h_BxLxD = mlp(self.mlp_ratio * self.embed_dim, out_stddev, dtype, name=f"block_{i}_mlp")(
        h_BxLxD
      )
      x_BxLxD = x_BxLxD + layers.Dropout(self.dropout, deterministic=not train)(h_BxLxD)
    x_BxLxD = _norm(self.norm, "final_norm")(x_BxLxD).astype(dtype)
    if self.tied_embeddings:
      logits_BxLxV = embedding.attend(x_BxLxD)
    else:
      logits_BxLxV = layers.Dense(
        self.rows, use_bias=False, dtype=dtype,
        kernel_init=_init(0.02, ("embed", "vocab")), name="head",
      )(x_BxLxD)  # fmt: skip
    return layers.constrain(logits_BxLxV.astype(jnp.float32), ("batch", None, "vocab"))
