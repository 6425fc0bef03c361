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
    logits_BxV = logits_BxV[:, : model.vocab_size]  # not the padding rows (pad_vocab_to)
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


# --- Encoder-decoder models (translation): greedy and beam search.
#
# Shapes: B batch, S source length, K beams, T decoded length, V vocabulary, D width.


def _seq2seq_cache(model, params, encoded_BxSxD, mask_BxS):
  shapes = jax.eval_shape(
    lambda: model.apply(
      {"params": params}, jnp.zeros((encoded_BxSxD.shape[0], 1), jnp.int32), encoded_BxSxD,
      mask_BxS, decode=True, method=model.decode, mutable=["cache"],
    )[1]["cache"]
  )  # fmt: skip
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _decode_step(model, params, cache, tokens_B, encoded_BxSxD, mask_BxS):
  """One decoder step: (log-probabilities (B, V), updated cache)."""
  logits_Bx1xV, mutated = model.apply(
    {"params": params, "cache": cache}, tokens_B[:, None], encoded_BxSxD, mask_BxS,
    decode=True, method=model.decode, mutable=["cache"],
  )  # fmt: skip
  return jax.nn.log_softmax(logits_Bx1xV[:, 0].astype(jnp.float32)), mutated["cache"]


def greedy(model, params, inputs_BxS, max_new_tokens: int, bos_id: int, eos_id: int):
  """The most likely token at each step until EOS (then EOS again): (B, max_new_tokens)."""
  encoded_BxSxD, mask_BxS = model.apply({"params": params}, inputs_BxS, method=model.encode)
  batch = inputs_BxS.shape[0]

  def step(carry, _):
    cache, tokens_B, done_B = carry
    log_probs_BxV, cache = _decode_step(model, params, cache, tokens_B, encoded_BxSxD, mask_BxS)
    next_B = jnp.where(done_B, eos_id, jnp.argmax(log_probs_BxV, -1).astype(jnp.int32))
    return (cache, next_B, done_B | (next_B == eos_id)), next_B

  start = (
    _seq2seq_cache(model, params, encoded_BxSxD, mask_BxS),
    jnp.full((batch,), bos_id, jnp.int32),
    jnp.zeros((batch,), bool),
  )
  _, tokens_TxB = jax.lax.scan(step, start, None, length=max_new_tokens)
  return tokens_TxB.T


def length_penalty(length, alpha: float):
  """GNMT's ((5 + length) / 6) ** alpha (Wu et al. 2016): the score is log p / this."""
  return ((5.0 + length) / 6.0) ** alpha


def beam_search(
  model, params, inputs_BxS, beam_size: int, max_new_tokens: int, alpha: float, bos_id, eos_id
):
  """Beam search with GNMT length normalisation: the best finished hypothesis per row
  (B, max_new_tokens), EOS-padded; a row with none finished gives its best live beam.

  Each step extends the K live beams by every token, keeps the 2K best by log
  probability, moves those ending in EOS to the finished pool (scored log p /
  length_penalty) and keeps the K best others live; K finished hypotheses
  whose score no live beam can beat stop a row (checked at the end here: the
  loop runs max_new_tokens steps inside one jitted scan).
  """
  k, t_max = beam_size, max_new_tokens
  encoded_BxSxD, mask_BxS = model.apply({"params": params}, inputs_BxS, method=model.encode)
  batch = inputs_BxS.shape[0]
  flat = lambda x: x.reshape(batch * k, *x.shape[2:])  # noqa: E731  (B, K, ...) -> (B*K, ...)
  encoded_BKxSxD = flat(jnp.repeat(encoded_BxSxD[:, None], k, axis=1))
  mask_BKxS = flat(jnp.repeat(mask_BxS[:, None], k, axis=1))
  neg_inf = jnp.float32(-1e9)

  def gather_beams(tree, beams_BxK):
    """Reorders (B*K, ...) leaves by beam index per row; scalars stay."""

    def one(x):
      if x.ndim == 0:
        return x
      x_BxKx_ = x.reshape(batch, k, *x.shape[1:])
      index = beams_BxK.reshape(batch, k, *([1] * (x.ndim - 1)))
      return flat(jnp.take_along_axis(x_BxKx_, index, axis=1))

    return jax.tree.map(one, tree)

  def step(carry, t):
    cache, alive_BxKxT, alive_logp_BxK, done_BxKxT, done_score_BxK = carry
    log_probs, cache = _decode_step(
      model, params, cache, flat(alive_BxKxT)[:, t], encoded_BKxSxD, mask_BKxS
    )
    vocab = log_probs.shape[-1]
    candidates_BxKV = (alive_logp_BxK[:, :, None] + log_probs.reshape(batch, k, vocab)).reshape(
      batch, k * vocab
    )
    top_logp_Bx2K, top_index_Bx2K = jax.lax.top_k(candidates_BxKV, 2 * k)
    beam_Bx2K, token_Bx2K = top_index_Bx2K // vocab, (top_index_Bx2K % vocab).astype(jnp.int32)
    seqs_Bx2KxT = jnp.take_along_axis(alive_BxKxT, beam_Bx2K[:, :, None], axis=1)
    seqs_Bx2KxT = seqs_Bx2KxT.at[:, :, t + 1].set(token_Bx2K)
    ended_Bx2K = token_Bx2K == eos_id
    # Live: the K best that did not end.
    live_logp_Bx2K = jnp.where(ended_Bx2K, neg_inf, top_logp_Bx2K)
    live_logp_BxK, live_Bx_K = jax.lax.top_k(live_logp_Bx2K, k)
    alive_BxKxT = jnp.take_along_axis(seqs_Bx2KxT, live_Bx_K[:, :, None], axis=1)
    cache = gather_beams(cache, jnp.take_along_axis(beam_Bx2K, live_Bx_K, axis=1))
    # Finished: the K best of the old pool and the ones that ended now.
    score_Bx2K = jnp.where(
      ended_Bx2K, top_logp_Bx2K / length_penalty(t + 1, alpha), neg_inf
    )  # t + 1 tokens, EOS included
    pool_score = jnp.concatenate([done_score_BxK, score_Bx2K], axis=1)
    pool_seqs = jnp.concatenate([done_BxKxT, seqs_Bx2KxT], axis=1)
    done_score_BxK, best_Bx_K = jax.lax.top_k(pool_score, k)
    done_BxKxT = jnp.take_along_axis(pool_seqs, best_Bx_K[:, :, None], axis=1)
    return (cache, alive_BxKxT, live_logp_BxK, done_BxKxT, done_score_BxK), None

  start_seqs = jnp.full((batch, k, t_max + 1), eos_id, jnp.int32).at[:, :, 0].set(bos_id)
  first_logp = jnp.tile(jnp.array([0.0] + [-1e9] * (k - 1), jnp.float32), (batch, 1))
  start = (
    _seq2seq_cache(model, params, encoded_BKxSxD, mask_BKxS),
    start_seqs,
    first_logp,
    start_seqs,
    jnp.full((batch, k), neg_inf),
  )
  (_, alive, alive_logp, done, done_score), _ = jax.lax.scan(step, start, jnp.arange(t_max))
  any_done_B = done_score[:, 0] > neg_inf / 2
  best = jnp.where(any_done_B[:, None], done[:, 0], alive[:, 0])
  return best[:, 1:]


def translate(model, params, inputs_NxS, beam_size=4, alpha=0.6, max_new_tokens=0, batch=128,
              bos_id=2, eos_id=3) -> np.ndarray:  # fmt: skip
  """Beam search (beam_size 1: greedy) over rows of source ids in batches: (N, T) ids.
  `max_new_tokens=0`: the source length + 50, as fairseq's default."""
  inputs_NxS = np.asarray(inputs_NxS, np.int32)
  t_max = max_new_tokens or inputs_NxS.shape[1] + 50
  t_max = min(t_max, model.max_len)
  if beam_size == 1:
    run = jax.jit(lambda p, x: greedy(model, p, x, t_max, bos_id, eos_id))
  else:
    run = jax.jit(lambda p, x: beam_search(model, p, x, beam_size, t_max, alpha, bos_id, eos_id))
  outputs = []
  for start in range(0, len(inputs_NxS), batch):
    chunk = inputs_NxS[start : start + batch]
    padded = np.zeros((batch, chunk.shape[1]), np.int32)  # one shape: one compilation
    padded[: len(chunk)] = chunk
    outputs.append(np.asarray(run(params, padded))[: len(chunk)])
  return np.concatenate(outputs)
