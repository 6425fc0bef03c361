"""Sampling from a decoder-only LM with a key/value cache: temperature, top-k, top-p.

The prompt is run once through the model in decode mode (filling the cache),
then one token per step, inside one jitted `lax.scan`. When the cache is full
(the model's max_len), the last max_len/2 tokens are run through a fresh cache
and sampling goes on, so any length can be generated.

Shapes: B batch, P prompt length, C context length, N new tokens, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def init_cache(model, batch_size: int):
  """Zeros for every variable of the model's "cache" collection."""
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((batch_size, 1), jnp.int32), decode=True)
  )["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def filter_logits(logits_BxV, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """Logits to sample from: divided by temperature, all but the top k and the top-p
  nucleus (the fewest most likely tokens whose probability reaches top_p) set to -inf."""
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  if 0 < top_k < logits_BxV.shape[-1]:  # as nanoGPT: k >= V keeps every token
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # probability of the more likely ones
    kept = jnp.where(before_BxV < top_p, sorted_BxV, jnp.inf)
    threshold_Bx1 = jnp.min(kept, axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)
  return logits_BxV


def _window(model, params, context_BxC, key, steps, temperature, top_k, top_p):
  """Fills a fresh cache with the context, then samples `steps` tokens: (B, steps)."""
  batch = context_BxC.shape[0]
  logits_BxCxV, mutated = model.apply(
    {"params": params, "cache": init_cache(model, batch)}, context_BxC, decode=True,
    mutable=["cache"],
  )  # fmt: skip

  def choose(logits_BxV, key):
    if temperature == 0.0:
      return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits_BxV, temperature, top_k, top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

  def step(carry, key):
    cache, logits_BxV = carry
    token_B = choose(logits_BxV, key)
    logits_Bx1xV, mutated = model.apply(
      {"params": params, "cache": cache}, token_B[:, None], decode=True, mutable=["cache"]
    )
    return (mutated["cache"], logits_Bx1xV[:, -1]), token_B

  carry = (mutated["cache"], logits_BxCxV[:, -1])
  _, tokens_NxB = jax.lax.scan(step, carry, jax.random.split(key, steps))
  return tokens_NxB.T


def sample(
  model, params, prompt_BxP, num_tokens: int, key, temperature=1.0, top_k=0, top_p=1.0
) -> np.ndarray:
  """`num_tokens` new tokens after each prompt row: (B, N). temperature=0 is greedy."""
  prompt_BxP = np.asarray(prompt_BxP, np.int32)
  if prompt_BxP.ndim != 2 or prompt_BxP.shape[1] == 0:
    raise ValueError(f"prompt must be (batch, length >= 1) token ids, got {prompt_BxP.shape}")
  keep = max(1, model.max_len // 2)  # context carried into a fresh cache
  window = jax.jit(_window, static_argnums=(0, 4, 5, 6, 7))
  tokens_BxT = prompt_BxP if prompt_BxP.shape[1] < model.max_len else prompt_BxP[:, -keep:]
  generated, remaining = [], num_tokens
  while remaining > 0:
    steps = min(model.max_len - tokens_BxT.shape[1], remaining)
    remaining -= steps
    key, window_key = jax.random.split(key)
    new_BxS = np.asarray(
      window(model, params, jnp.asarray(tokens_BxT), window_key, steps, temperature, top_k, top_p)
    )
    generated.append(new_BxS)
    tokens_BxT = np.concatenate([tokens_BxT, new_BxS], axis=1)[:, -keep:]
  return np.concatenate(generated, axis=1)
