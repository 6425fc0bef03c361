"""Model FLOPs per training step, from documented formulas (for MFU).

Transformer LM (decoder, per step of B sequences of S tokens; W width, L
layers, F = mlp_ratio * W, V vocabulary), counting a multiply-add as 2 FLOPs
and the backward pass as twice the forward (so x3), as Kaplan et al. and
MaxText do:

- `six_n`: 6 * N * B * S with N the parameters of every matrix multiply:
  L * (4 W^2 + 2 W F) in the blocks plus V * W for the output logits (the
  token and position embeddings are lookups: no FLOPs).
- `with_attention`: six_n plus the attention scores and their use on the values,
  3 * 2 * 2 * L * B * S^2 * W, halved for causal attention (MaxText's
  "causal" count: only the lower triangle is computed in principle).

MFU = model FLOPs per second / peak FLOPs per second of the devices.
"""

from __future__ import annotations

import time


def transformer_lm(batch: int, seq_len: int, num_layers: int, width: int, mlp_ratio: float,
                   vocab_size: int, causal: bool = True) -> dict[str, float]:  # fmt: skip
  """{'params_matmul', 'six_n', 'with_attention'}: FLOPs per training step."""
  hidden = mlp_ratio * width
  matmul_params = num_layers * (4 * width * width + 2 * width * hidden) + vocab_size * width
  tokens = batch * seq_len
  six_n = 6.0 * matmul_params * tokens
  attention = 3 * 2 * 2 * num_layers * batch * seq_len * seq_len * width
  if causal:
    attention /= 2
  return {"params_matmul": matmul_params, "six_n": six_n, "with_attention": six_n + attention}


def measured_peak(size: int = 2048, dtype: str = "float32", repeats: int = 10) -> float:
  """FLOP/s of a jitted size x size matmul on the default device (best of `repeats`)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (size, size), getattr(jnp, dtype))
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * size**3 / best
