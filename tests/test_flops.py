"""The FLOPs formula against the model's own parameters and XLA's count of its forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from research import flops, registry


def test_transformer_flops_match_the_model_and_xla():
  layers, width, heads, vocab, batch, seq = 2, 64, 4, 65, 4, 32
  model = registry.models.get("transformer_lm")(
    num_layers=layers, num_heads=heads, embed_dim=width, max_len=seq, vocab_size=vocab
  )
  tokens = jnp.zeros((batch, seq), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), tokens, train=False))["params"]
  counted = flops.transformer_lm(batch, seq, layers, width, 4, vocab, causal=False)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  block_matmuls = sum(
    int(np.prod(v.shape))
    for p, v in flat
    if v.ndim >= 2 and "embedding" not in jax.tree_util.keystr(p)
  )
  assert counted["params_matmul"] == block_matmuls + vocab * width  # tied output projection
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
  xla = apply.lower(params, tokens).compile().cost_analysis()["flops"]
  assert xla == pytest.approx(counted["with_attention"] / 3, rel=0.1)  # forward: a third
  causal = flops.transformer_lm(batch, seq, layers, width, 4, vocab)
  assert causal["six_n"] < causal["with_attention"] < counted["with_attention"]


def test_config_flops_count_the_padded_vocabulary_rows():
  """config_counts takes the logits' rows: pad_vocab_to where it is above the data's."""
  import ml_collections

  config = ml_collections.ConfigDict(
    {"model": {"name": "transformer_lm", "num_layers": 2, "embed_dim": 64, "pad_vocab_to": 0},
     "global_batch_size": 4, "data": {"seq_len": 32}}
  )  # fmt: skip
  plain = flops.config_counts(config, {"vocab_size": 65})
  assert plain == flops.transformer_lm(4, 32, 2, 64, 4, 65)
  config.model.pad_vocab_to = 512
  padded = flops.config_counts(config, {"vocab_size": 65})
  assert padded["params_matmul"] - plain["params_matmul"] == (512 - 65) * 64
  config.model.pad_vocab_to = 32  # below the data's: no effect
  assert flops.config_counts(config, {"vocab_size": 65}) == plain
