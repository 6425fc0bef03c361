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


def test_a_cpu_peak_is_reused_for_ten_minutes_on_the_same_machine_and_flags(tmp_path):
  path = tmp_path / "jax_cpu_peak.json"
  calls = []

  def measure(value):
    return lambda: calls.append(value) or value

  key = {"host": "h", "devices": 1, "xla_flags": ""}
  assert flops.reused_peak(key, measure(4e11), path, now=1000.0) == (4e11, 1000.0)
  assert flops.reused_peak(key, measure(9e11), path, now=1500.0) == (4e11, 1000.0)  # reused
  other = {**key, "xla_flags": "--xla_cpu_experimental_ynn_fusion_type=dot"}
  assert flops.reused_peak(other, measure(3e11), path, now=1501.0) == (3e11, 1501.0)
  assert flops.reused_peak(other, measure(5e11), path, now=1501.0 + 601) == (5e11, 2102.0)
  assert flops.reused_peak(key, measure(6e11), None, now=2103.0) == (6e11, 2103.0)  # no cache
  path.write_text("{not json")  # a torn file is measured over, never an error
  assert flops.reused_peak(key, measure(7e11), path, now=2104.0) == (7e11, 2104.0)
  assert calls == [4e11, 3e11, 5e11, 6e11, 7e11]


def test_a_second_process_reuses_the_first_ones_cpu_peak(tmp_path):
  """Two processes sharing a compilation cache: the second reuses the first's peak."""
  import os
  import subprocess
  import sys

  from research import config as config_lib

  code = "from research import flops; print(*flops.peak_per_device(), sep='|')"
  env = dict(os.environ, RESEARCH_COMPILATION_CACHE=str(tmp_path / "jax"), JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = str(config_lib.REPO_ROOT)
  runs = [
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    for _ in range(2)
  ]
  assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
  first, second = (r.stdout.strip().split("|") for r in runs)
  assert first == second and float(first[0]) > 1e9 and first[1].startswith("measured at ")
  assert (tmp_path / "jax_cpu_peak.json").exists()
