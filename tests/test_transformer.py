"""The decoder-only Transformer LM: shapes, causality, variants, parameter count, axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers.remat import recomputed_matmuls

from research import config as config_lib
from research import registry
from research.models import transformer


def _model(**overrides):
  kwargs = {k: v for k, v in config_lib.entry("model", "transformer_lm").items() if k != "name"}
  kwargs.update(num_layers=2, num_heads=2, embed_dim=32, max_len=16)
  kwargs.update(overrides)
  return registry.models.get("transformer_lm")(vocab_size=11, **kwargs)


def _init(model, length=16):
  tokens_BxL = jax.random.randint(jax.random.key(0), (3, length), 0, 11)
  variables = model.init(jax.random.key(1), tokens_BxL)
  return tokens_BxL, variables


@pytest.mark.parametrize(
  "overrides",
  [{}, {"positions": "rotary"}, {"norm": "rmsnorm"}, {"tied_embeddings": False},
   {"dtype": "bfloat16"}, {"dropout": 0.1}, {"attention": "auto"}, {"attention": "xla"}],
)  # fmt: skip
def test_shapes_axes_and_causality(overrides):
  model = _model(**overrides)
  tokens_BxL, variables = _init(model)
  boxed = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(p, nn.LogicallyPartitioned) for p in boxed)  # every parameter named
  params = nn.meta.unbox(variables)
  logits_BxLxV = model.apply(params, tokens_BxL)
  assert logits_BxLxV.shape == (3, 16, 11) and logits_BxLxV.dtype == jnp.float32
  # Changing token 9 changes no logit before position 9, and some after.
  changed = model.apply(params, tokens_BxL.at[:, 9].set((tokens_BxL[:, 9] + 1) % 11))
  np.testing.assert_array_equal(changed[:, :9], logits_BxLxV[:, :9])
  assert not np.allclose(changed[:, 9:], logits_BxLxV[:, 9:])
  if overrides.get("dropout"):
    train = lambda seed: model.apply(  # noqa: E731
      params, tokens_BxL, train=True, rngs={"dropout": jax.random.key(seed)}
    )
    assert not np.allclose(train(0), train(1))
    np.testing.assert_array_equal(train(0), train(0))


def test_fused_attention_computes_the_same_function_and_gradients():
  """jax.nn.dot_product_attention (cuDNN's flash attention on GPUs) against the einsum path,
  decoding with a cache included."""
  model = _model()
  tokens_BxL, variables = _init(model)
  params = nn.meta.unbox(variables)
  loss = lambda m: lambda p: m.apply(p, tokens_BxL).mean()  # noqa: E731
  fused = _model(attention="xla")
  np.testing.assert_allclose(fused.apply(params, tokens_BxL), model.apply(params, tokens_BxL),
                             rtol=1e-5, atol=1e-6)  # fmt: skip
  for got, want in zip(jax.tree.leaves(jax.grad(loss(fused))(params)),
                       jax.tree.leaves(jax.grad(loss(model))(params)), strict=True):  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match="has no attention dropout"):
    _model(attention="xla", dropout=0.1).apply(
      params, tokens_BxL, train=True, rngs={"dropout": jax.random.key(0)}
    )
  with pytest.raises(ValueError, match="model.attention='flash': valid: einsum, auto"):
    _model(attention="flash").apply(params, tokens_BxL)


def test_causal_query_blocks_compute_the_same_function_and_gradients(monkeypatch):
  """Causal self-attention with its queries in blocks (each against the keys up to its
  end; the CPU's default) against one block: same logits and gradients, still causal."""
  model = _model(max_len=128, embed_dim=32, num_heads=2)
  tokens_BxL, variables = _init(model, length=128)
  params = nn.meta.unbox(variables)
  loss = lambda p: model.apply(p, tokens_BxL).mean()  # noqa: E731
  assert transformer.causal_query_blocks(128) == 4 and transformer.causal_query_blocks(90) == 1
  blocked, blocked_grads = model.apply(params, tokens_BxL), jax.grad(loss)(params)
  changed = model.apply(params, tokens_BxL.at[:, 70].set((tokens_BxL[:, 70] + 1) % 11))
  np.testing.assert_array_equal(changed[:, :70], blocked[:, :70])
  assert not np.allclose(changed[:, 70:], blocked[:, 70:])
  monkeypatch.setitem(transformer.CAUSAL_QUERY_BLOCKS, "cpu", 1)
  assert transformer.causal_query_blocks(128) == 1
  np.testing.assert_allclose(blocked, model.apply(params, tokens_BxL), rtol=1e-5, atol=1e-6)
  for got, want in zip(jax.tree.leaves(blocked_grads), jax.tree.leaves(jax.grad(loss)(params)),
                       strict=True):  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_auto_attention_asks_cudnn_on_a_gpu_in_half_precision_and_falls_back(monkeypatch):
  """`auto` on a GPU in bf16: cuDNN's flash attention; where cuDNN refuses while tracing,
  XLA's; in float32 or off a GPU, XLA's without asking (jax.nn's own default is XLA's)."""
  from research.models import transformer

  real = jax.nn.dot_product_attention
  asked = []

  def recording(*args, implementation=None, refuse=False, **kwargs):
    asked.append(implementation)
    if implementation == "cudnn" and refuse:
      raise NotImplementedError("The head dim must be <= 256 and a multiple of 8")
    return real(*args, implementation="xla" if implementation == "cudnn" else implementation,
                **kwargs)  # fmt: skip

  model = _model(attention="auto", dtype="bfloat16")
  tokens_BxL, variables = _init(model)
  params = nn.meta.unbox(variables)
  want = _model(attention="xla", dtype="bfloat16").apply(params, tokens_BxL)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for refuse, first in ((False, "cudnn"), (True, "cudnn")):
    asked.clear()
    monkeypatch.setattr(
      jax.nn,
      "dot_product_attention",
      lambda *a, refuse=refuse, **k: recording(*a, refuse=refuse, **k),
    )
    np.testing.assert_array_equal(model.apply(params, tokens_BxL), want)
    assert asked[0] == first and asked.count("xla") == (2 if refuse else 0)  # two layers
  asked.clear()
  _model(attention="auto").apply(params, tokens_BxL)  # float32: XLA's, cuDNN not asked
  assert asked == ["xla", "xla"]
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  asked.clear()
  model.apply(params, tokens_BxL)
  assert asked == ["xla", "xla"]
  assert transformer.ATTENTION_IMPLS == ("einsum", "auto", "xla", "cudnn")


def test_parameter_count_matches_nanogpt():
  """nanoGPT's CPU config (4 layers, width 128, context 64, 65 characters): 0.80M."""
  model = registry.models.get("transformer_lm")(
    vocab_size=65, num_layers=4, num_heads=4, embed_dim=128, max_len=64
  )
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 64), jnp.int32)))
  count = sum(p.size for p in jax.tree.leaves(params))
  per_block = 4 * 128 * 128 + 2 * 128 * 512 + 2 * 128  # attention, MLP, two norm scales
  assert count == 65 * 128 + 64 * 128 + 4 * per_block + 128 == 804_096


def test_rotary_rotates_pairs_by_position():
  x_BxLxHxK = jnp.ones((1, 3, 1, 4))
  rotated = transformer.rotary(x_BxLxHxK, jnp.arange(3))
  np.testing.assert_allclose(rotated[0, 0], x_BxLxHxK[0, 0])  # position 0: unchanged
  norms = jnp.linalg.norm(rotated, axis=-1)
  np.testing.assert_allclose(norms, jnp.linalg.norm(x_BxLxHxK, axis=-1), rtol=1e-6)
  # Relative: the same q and k at every position give q(m) . k(n) that depends on m - n only.
  q_1x1x1xK, k_1x1x1xK = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 4))
  rotate = lambda v: transformer.rotary(jnp.broadcast_to(v, (1, 8, 1, 4)), jnp.arange(8))  # noqa: E731
  dots_LxL = jnp.einsum("blhk,bmhk->lm", rotate(q_1x1x1xK), rotate(k_1x1x1xK))
  np.testing.assert_allclose(dots_LxL[3, 1], dots_LxL[2, 0], rtol=1e-5)
  np.testing.assert_allclose(dots_LxL[7, 5], dots_LxL[2, 0], rtol=1e-5)
  assert not np.isclose(dots_LxL[3, 1], dots_LxL[3, 2])


def test_remat_recomputes_in_the_backward_pass_and_changes_nothing():
  """model.remat: the same loss and gradients, and the gradient's program recomputing
  the forward's matmuls: "full" each one whose output the backward pass reads (per
  layer q, k, v, the two attention matmuls, the MLP's first: 6), "minimal" the
  attention's two batched ones only (MaxText's policy of that name). XLA:CPU drops the
  optimization barriers that keep the recomputation apart and merges it back into the
  forward pass, so on this CPU memory and time do not change."""
  tokens_BxL, _ = _init(_model())
  extra = recomputed_matmuls(lambda **kw: _model(dropout=0.1, **kw), tokens_BxL)
  assert extra == {"none": 0, "full": 6 * 2, "minimal": 2 * 2}  # two layers
  with pytest.raises(ValueError, match="model.remat='all': valid: none, full, minimal"):
    _init(_model(remat="all"))


def test_bad_options_name_the_key():
  model = _model(positions="alibi")
  with pytest.raises(ValueError, match="model.positions='alibi'"):
    _init(model)
  with pytest.raises(ValueError, match="sequence length 17 > model.max_len=16"):
    _init(_model(), length=17)


def test_gpt2_124m_config_has_gpt2_small_parameter_count():
  """shakespeare_char.py:size=gpt2_124m: GPT-2 small's shape with its vocabulary padded
  as nanoGPT pads it, so 124M parameters on 65 characters (abstract: nothing runs)."""
  config = config_lib.load_file(
    f"{config_lib.REPO_ROOT}/experiments/shakespeare_char.py:size=gpt2_124m"
  )
  assert config.model.pad_vocab_to == 50_304 and config.dtype == "bfloat16"
  model = registry.models.get("transformer_lm")(
    **{k: v for k, v in config.model.items() if k != "name"}, vocab_size=65
  )
  tokens = jax.ShapeDtypeStruct((1, config.data.seq_len), np.int32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), tokens)
  count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nn.meta.unbox(shapes)["params"]))
  assert count == 124_373_760  # nanoGPT's GPT-2 (bias=False, padded vocabulary): 124M
