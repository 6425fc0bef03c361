"""Vision Transformer (Dosovitskiy et al. 2021): patches -> pre-norm Transformer encoder.

Shapes: B batch, H height, W width, C channels, P patch size, N patches (+1 with
the class token), D width (embed), K classes.

Parameters carry the same logical axes as the Transformer LM's (embed, heads,
kv, mlp), so the same sharding rules give FSDP and tensor parallelism.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from research import registry
from research.models import layers
from research.models.transformer import Attention, MLPBlock, _init, _norm

POOLS = ("cls", "mean")
POSITION_EMBEDDINGS = ("learned", "sincos2d")


def sincos_2d(rows: int, cols: int, width: int, temperature: float = 10_000.0) -> jax.Array:
  """Fixed 2-D position embeddings (rows*cols, width): a quarter of the width each for
  sin and cos of the column, then of the row, at geometric frequencies (as big_vision's
  posemb="sincos2d", from "Better plain ViT baselines", Beyer et al. 2022)."""
  if width % 4:
    raise ValueError(f"model.embed_dim={width}: sincos2d position embeddings need a multiple of 4")
  row_M, col_M = (a.reshape(-1) for a in jnp.mgrid[:rows, :cols])
  quarter = width // 4
  omega_Q = temperature ** -(jnp.arange(quarter) / max(quarter - 1, 1))
  col_MxQ, row_MxQ = col_M[:, None] * omega_Q, row_M[:, None] * omega_Q
  return jnp.concatenate(
    [jnp.sin(col_MxQ), jnp.cos(col_MxQ), jnp.sin(row_MxQ), jnp.cos(row_MxQ)], axis=1
  )


class EncoderBlock(nn.Module):
  """x + attention(norm(x)), then x + mlp(norm(x)); full (not causal) self-attention."""

  num_heads: int
  mlp_ratio: int
  dropout: float
  out_stddev: float
  dtype: jnp.dtype
  norm: str = "layernorm"
  qkv_stddev: float = 0.02
  drop_path: float = 0.0  # stochastic depth: drop each residual branch per example

  @nn.compact
  def __call__(self, x_BxNxD: jax.Array, train: bool, mask_BxN: jax.Array | None = None):
    width = x_BxNxD.shape[-1]
    positions_N = jnp.arange(x_BxNxD.shape[1])
    drop = layers.Dropout(self.dropout, deterministic=not train)
    h_BxNxD = _norm(self.norm, "norm_1")(x_BxNxD).astype(self.dtype)
    h_BxNxD = Attention(
      self.num_heads, width // self.num_heads, "learned", self.dropout, self.out_stddev,
      self.dtype, x_BxNxD.shape[1], causal=False, qkv_stddev=self.qkv_stddev, name="attention",
    )(h_BxNxD, positions_N, train, mask_BxS=mask_BxN)  # fmt: skip
    drop_path = layers.DropPath(self.drop_path)
    x_BxNxD = x_BxNxD + drop_path(drop(h_BxNxD), train)
    h_BxNxD = _norm(self.norm, "norm_2")(x_BxNxD).astype(self.dtype)
    h_BxNxD = MLPBlock(self.mlp_ratio * width, self.out_stddev, self.dtype, name="mlp")(h_BxNxD)
    return x_BxNxD + drop_path(drop(h_BxNxD), train)


def patchify(x_BxHxWxC: jax.Array, patch: int) -> jax.Array:
  """(B, H, W, C) -> (B, N, P*P*C), patches in row-major order."""
  b, h, w, c = x_BxHxWxC.shape
  if h % patch or w % patch:
    raise ValueError(f"model.patch_size={patch} does not divide the image size {h}x{w}")
  x = x_BxHxWxC.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


@registry.models.register("vit")
class ViT(nn.Module):
  """Images (B, H, W, C) -> class logits (B, K)."""

  num_classes: int = 10
  patch_size: int = 4
  num_layers: int = 6
  num_heads: int = 4
  embed_dim: int = 128
  mlp_ratio: int = 4
  pool: str = "cls"  # or "mean" over the patch tokens
  position_embedding: str = "learned"  # or "sincos2d": fixed, on the patch tokens only
  dropout: float = 0.0
  stochastic_depth: float = 0.0  # drop rate of the last block; earlier blocks scale linearly
  remat: str = "none"  # "full" or "minimal": recompute activations in backward (layers.remat)
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
    if self.pool not in POOLS:
      raise ValueError(f"model.pool={self.pool!r}: valid: {', '.join(POOLS)}")
    if self.position_embedding not in POSITION_EMBEDDINGS:
      raise ValueError(
        f"model.position_embedding={self.position_embedding!r}: valid: "
        + ", ".join(POSITION_EMBEDDINGS)
      )
    if self.embed_dim % self.num_heads:
      raise ValueError(f"model.embed_dim={self.embed_dim} is not divisible by num_heads")
    block = layers.remat(EncoderBlock, self.remat, static_argnums=(2,), train=train)
    dtype = layers.compute_dtype(self.dtype)
    patches_BxNxF = patchify(x_BxHxWxC.astype(dtype), self.patch_size)
    x_BxNxD = layers.dense(self.embed_dim, (None, "embed"), dtype, "patch_embedding")(patches_BxNxF)
    if self.position_embedding == "sincos2d":  # before the class token, which gets none
      rows, cols = (size // self.patch_size for size in x_BxHxWxC.shape[1:3])
      x_BxNxD = x_BxNxD + sincos_2d(rows, cols, self.embed_dim).astype(dtype)
    if self.pool == "cls":
      cls_1x1xD = self.param("cls", _init(0.02, (None, None, "embed")), (1, 1, self.embed_dim))
      cls_Bx1xD = jnp.broadcast_to(cls_1x1xD, (x_BxNxD.shape[0], 1, self.embed_dim))
      x_BxNxD = jnp.concatenate([cls_Bx1xD.astype(dtype), x_BxNxD], axis=1)
    if self.position_embedding == "learned":
      positions_NxD = self.param(
        "position_embedding", _init(0.02, (None, "embed")), x_BxNxD.shape[1:]
      )
      x_BxNxD = x_BxNxD + positions_NxD.astype(dtype)
    x_BxNxD = layers.Dropout(self.dropout, deterministic=not train)(x_BxNxD)
    x_BxNxD = layers.constrain(x_BxNxD, ("batch", None, "embed"))
    out_stddev = 0.02 / (2 * self.num_layers) ** 0.5
    for i in range(self.num_layers):
      x_BxNxD = block(
        self.num_heads, self.mlp_ratio, self.dropout, out_stddev, dtype,
        qkv_stddev=self.embed_dim**-0.5,
        drop_path=self.stochastic_depth * (i + 1) / self.num_layers, name=f"block_{i}",
      )(x_BxNxD, train)  # fmt: skip
    x_BxNxD = _norm("layernorm", "final_norm")(x_BxNxD)
    x_BxD = x_BxNxD[:, 0] if self.pool == "cls" else jnp.mean(x_BxNxD, axis=1)
    logits_BxK = layers.dense(self.num_classes, ("embed", "classes"), dtype, "head")(x_BxD)
    return logits_BxK.astype(jnp.float32)
