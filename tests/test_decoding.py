"""KV-cache decoding equals the full forward pass; sampling filters and lengths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from research import decoding, registry


def _lm(positions="learned", max_len=12):
  model = registry.models.get("transformer_lm")(
    vocab_size=11, num_layers=2, num_heads=2, embed_dim=16, max_len=max_len, positions=positions
  )
  tokens_BxL = jax.random.randint(jax.random.key(0), (2, max_len), 0, 11)
  return model, nn.meta.unbox(model.init(jax.random.key(1), tokens_BxL))["params"], tokens_BxL


@pytest.mark.parametrize("positions,length", [("learned", 12), ("rotary", 12), ("learned", 128)])
def test_cached_decoding_equals_the_full_forward_pass(positions, length):
  """128 tokens: the full pass splits causal attention's queries into blocks on the CPU
  (transformer.causal_query_blocks); decoding takes them as they come."""
  model, params, tokens_BxL = _lm(positions, length)
  full_BxLxV = model.apply({"params": params}, tokens_BxL)
  cache, pieces = decoding.init_cache(model, 2), []
  prompt = length - 7
  for start, stop in [(0, prompt)] + [(t, t + 1) for t in range(prompt, length)]:  # then 1 by 1
    logits, mutated = model.apply(
      {"params": params, "cache": cache}, tokens_BxL[:, start:stop], decode=True, mutable=["cache"]
    )
    pieces.append(logits)
    cache = mutated["cache"]
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full_BxLxV, atol=1e-6)


def test_greedy_sampling_equals_argmax_of_the_full_forward_pass():
  model, params, _ = _lm()
  prompt = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
  sampled = decoding.sample(model, params, prompt, 20, jax.random.key(0), temperature=0.0)
  assert sampled.shape == (2, 20)
  tokens = prompt
  for _ in range(9):  # no cache, the whole sequence each time, within max_len
    logits = model.apply({"params": params}, tokens)
    tokens = np.concatenate([tokens, np.argmax(logits[:, -1], -1)[:, None]], axis=1)
  # The first window (12 - 3 tokens); past max_len, sample refills its cache from the
  # last max_len/2 tokens, which no full pass of max_len tokens reproduces.
  np.testing.assert_array_equal(sampled[:, :9], tokens[:, 3:])


def test_filters_keep_the_top_k_and_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  top2 = decoding.filter_logits(logits, 1.0, top_k=2)
  assert np.isfinite(top2).tolist() == [[True, True, False, False]]
  nucleus = decoding.filter_logits(logits, 1.0, top_p=0.7)  # 0.5 < 0.7 <= 0.5 + 0.3
  assert np.isfinite(nucleus).tolist() == [[True, True, False, False]]
  assert np.isfinite(decoding.filter_logits(logits, 1.0, top_p=0.4)).sum() == 1  # at least one
  np.testing.assert_allclose(decoding.filter_logits(logits, 2.0), logits / 2)


def test_sampling_is_a_function_of_the_key():
  model, params, _ = _lm()
  prompt = np.array([[1, 2, 3]], np.int32)
  draw = lambda seed: decoding.sample(model, params, prompt, 15, jax.random.key(seed), top_k=5)  # noqa: E731
  np.testing.assert_array_equal(draw(0), draw(0))
  assert not np.array_equal(draw(0), draw(1))


def test_padded_vocabulary_rows_are_logits_but_never_sampled():
  """pad_vocab_to (GPT-2's 50,257 -> 50,304 in nanoGPT): the embedding and the logits
  have the padded rows; decoding picks among the data's vocabulary only, even where a
  padding row's logit is the largest."""
  model = registry.models.get("transformer_lm")(
    vocab_size=11, pad_vocab_to=64, num_layers=1, num_heads=2, embed_dim=16, max_len=12
  )
  tokens_BxL = jax.random.randint(jax.random.key(0), (2, 12), 0, 11)
  params = nn.meta.unbox(model.init(jax.random.key(1), tokens_BxL))["params"]
  assert params["embedding"]["embedding"].shape == (64, 16)
  assert model.apply({"params": params}, tokens_BxL).shape == (2, 12, 64)
  # Padding rows that are real rows times 10: the best real logit's copy beats it.
  table = params["embedding"]["embedding"]
  params["embedding"]["embedding"] = table.at[11:].set(10.0 * table[jnp.arange(11, 64) % 11])
  logits = model.apply({"params": params}, tokens_BxL)
  assert (jnp.argmax(logits, -1) >= 11).all()
  prompt = np.array([[1, 2, 3]], np.int32)
  for temperature in (0.0, 1.0):
    sampled = decoding.sample(model, params, prompt, 20, jax.random.key(2), temperature)
    assert sampled.shape == (1, 20) and sampled.max() < 11
