"""Encoder-decoder Transformer for translation (Vaswani et al. 2017), pre-norm.

Shapes: B batch, S source length, T target length, D width (embed), V shared
vocabulary (one subword model for both languages, as fairseq and the PyTorch
tutorials do for Multi30K), H heads, K head width.

Token id 0 is padding: source padding is masked in encoder and cross
attention; target padding only ever sits after the real tokens, where the
causal mask keeps it out of every real position and the loss ignores it.
Positions are sinusoidal (no parameters, any length). The decoder runs one
token at a time with a key/value cache (`decode=True`) for greedy and beam
search (research.decoding); cross-attention keys are recomputed from the
encoder output at each step (short sentences: cheaper than caching them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from research import registry
from research.models import layers
from research.models.transformer import Attention, MLPBlock, _init, _norm
from research.models.vit import EncoderBlock

PAD_ID = 0


def sinusoids(positions_L: jax.Array, width: int) -> jax.Array:
  """(L,) -> (L, D): sin on the first D/2 features, cos on the rest (Vaswani et al.)."""
  half = width // 2
  frequencies_D2 = 1.0 / (10_000 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles_LxD2 = positions_L[:, None].astype(jnp.float32) * frequencies_D2
  return jnp.concatenate([jnp.sin(angles_LxD2), jnp.cos(angles_LxD2)], axis=-1)


class DecoderPositions(nn.Module):
  """Positions of the tokens of this call: 0..T-1, or, decoding, after earlier calls'
  (a counter in the "cache" collection)."""

  @nn.compact
  def __call__(self, length: int, decode: bool) -> jax.Array:
    positions_T = jnp.arange(length)
    if decode:
      next_position = self.variable("cache", "next_position", jnp.zeros, (), jnp.int32)
      positions_T = positions_T + next_position.value
      next_position.value = next_position.value + length
    return positions_T


class DecoderBlock(nn.Module):
  """Causal self-attention, cross-attention to the encoder, MLP; each pre-norm + residual."""

  num_heads: int
  mlp_ratio: int
  dropout: float
  out_stddev: float
  dtype: jnp.dtype
  max_len: int
  qkv_stddev: float

  @nn.compact
  def __call__(self, x_BxTxD, positions_T, encoded_BxSxD, mask_BxS, train, decode):
    width = x_BxTxD.shape[-1]
    drop = layers.Dropout(self.dropout, deterministic=not train)
    attention = lambda causal, name: Attention(  # noqa: E731
      self.num_heads, width // self.num_heads, "sinusoidal", self.dropout, self.out_stddev,
      self.dtype, self.max_len, causal=causal, qkv_stddev=self.qkv_stddev, name=name,
    )  # fmt: skip
    h = _norm("layernorm", "norm_1")(x_BxTxD).astype(self.dtype)
    x_BxTxD = x_BxTxD + drop(attention(True, "self_attention")(h, positions_T, train, decode))
    h = _norm("layernorm", "norm_2")(x_BxTxD).astype(self.dtype)
    cross = attention(False, "cross_attention")
    x_BxTxD = x_BxTxD + drop(
      cross(h, positions_T, train, context_BxSxD=encoded_BxSxD, mask_BxS=mask_BxS)
    )
    h = _norm("layernorm", "norm_3")(x_BxTxD).astype(self.dtype)
    h = MLPBlock(self.mlp_ratio * width, self.out_stddev, self.dtype, name="mlp")(h)
    return x_BxTxD + drop(h)


@registry.models.register("transformer_seq2seq")
class Seq2SeqTransformer(nn.Module):
  """(source ids (B, S), decoder input ids (B, T)) -> next-token logits (B, T, V).

  Defaults: the base Transformer's shape at a third of its depth and half its
  width (3 + 3 layers, width 256, 4 heads), a size that fits Multi30K on a CPU.
  Embeddings are shared by encoder, decoder and output (tied). Two departures
  from the paper, both needed to learn even to copy or reverse a sequence in a
  few hundred steps (measured; tests/test_translation.py): embeddings are not
  scaled by sqrt(D) (with tied output weights that scale gives each position's
  own input token a logit of about sqrt(D) at initialisation, a prior to copy
  the decoder input that the model took thousands of steps to unlearn), and
  query, key and value projections start at std D**-0.5, not GPT-2's 0.02 (at
  width 64-256, 0.02 makes every attention uniform and its gradient tiny).
  """

  vocab_size: int
  num_layers: int = 3
  num_heads: int = 4
  embed_dim: int = 256
  mlp_ratio: int = 4
  max_len: int = 128
  dropout: float = 0.1
  dtype: str = "float32"

  def setup(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(f"model.embed_dim={self.embed_dim} is not divisible by num_heads")
    dtype = layers.compute_dtype(self.dtype)
    out_stddev = 0.02 / (2 * self.num_layers) ** 0.5
    qkv_stddev = self.embed_dim**-0.5
    self.embedding = layers.Embed(
      self.vocab_size, self.embed_dim, dtype=dtype,
      embedding_init=_init(self.embed_dim**-0.5, ("vocab", "embed")),
    )  # fmt: skip
    self.encoder_blocks = [
      EncoderBlock(
        self.num_heads, self.mlp_ratio, self.dropout, out_stddev, dtype, qkv_stddev=qkv_stddev
      )
      for _ in range(self.num_layers)
    ]
    self.decoder_blocks = [
      DecoderBlock(
        self.num_heads, self.mlp_ratio, self.dropout, out_stddev, dtype, self.max_len, qkv_stddev
      )
      for _ in range(self.num_layers)
    ]
    self.encoder_norm = _norm("layernorm", None)
    self.decoder_norm = _norm("layernorm", None)
    self.embed_dropout = layers.Dropout(self.dropout)
    self.positions = DecoderPositions()

  def _embed(self, ids_BxL, positions_L, train):
    x = self.embedding(ids_BxL)
    x = x + sinusoids(positions_L, self.embed_dim).astype(x.dtype)
    x = self.embed_dropout(x, deterministic=not train)
    return layers.constrain(x, ("batch", None, "embed"))

  def encode(self, inputs_BxS: jax.Array, train: bool = False):
    """Source ids -> (encoder output (B, S, D), source mask (B, S))."""
    mask_BxS = inputs_BxS != PAD_ID
    x_BxSxD = self._embed(inputs_BxS, jnp.arange(inputs_BxS.shape[1]), train)
    for block in self.encoder_blocks:
      x_BxSxD = block(x_BxSxD, train, mask_BxN=mask_BxS)
    return self.encoder_norm(x_BxSxD).astype(x_BxSxD.dtype), mask_BxS

  def decode(self, decoder_inputs_BxT, encoded_BxSxD, mask_BxS, train=False, decode=False):
    """Decoder input ids -> logits (B, T, V); `decode=True` continues from earlier calls."""
    length = decoder_inputs_BxT.shape[1]
    if length > self.max_len:
      raise ValueError(f"target length {length} > model.max_len={self.max_len}")
    positions_T = self.positions(length, decode)
    x_BxTxD = self._embed(decoder_inputs_BxT, positions_T, train)
    for block in self.decoder_blocks:
      x_BxTxD = block(x_BxTxD, positions_T, encoded_BxSxD, mask_BxS, train, decode)
    x_BxTxD = self.decoder_norm(x_BxTxD).astype(x_BxTxD.dtype)
    logits_BxTxV = self.embedding.attend(x_BxTxD)
    return layers.constrain(logits_BxTxV.astype(jnp.float32), ("batch", None, "vocab"))

  def __call__(self, inputs_BxS, decoder_inputs_BxT=None, *, train=False, decode=False):
    """`decoder_inputs=None` (initialisation) decodes the source itself: shapes only."""
    encoded_BxSxD, mask_BxS = self.encode(inputs_BxS, train)
    if decoder_inputs_BxT is None:
      decoder_inputs_BxT = inputs_BxS
    return self.decode(decoder_inputs_BxT, encoded_BxSxD, mask_BxS, train, decode)
