"""Every registered model: init/apply shapes, logical axis names, dropout, the conv layer."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers.remat import recomputed_matmuls
from helpers.xla import devices_flags

from research import config as config_lib
from research import registry
from research.models import layers

MODELS = registry.models.names()
# The LM: tests/test_transformer.py; the encoder-decoder: tests/test_translation.py.
IMAGE_MODELS = [m for m in MODELS if m not in ("transformer_lm", "transformer_seq2seq")]
SMALL = {"resnet": dict(depth=18, width=8)}  # ResNet-18's layout at an eighth of its width


def test_registry_has_the_issue_models():
  assert {"softmax_regression", "mlp", "lenet5", "cnn", "transformer_lm"} <= set(MODELS)


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_init_apply_shapes(name, dtype):
  kwargs = {k: v for k, v in config_lib.entry("model", name).items() if k != "name"}
  kwargs.update(SMALL.get(name, {}))
  model = registry.models.get(name)(**kwargs, num_classes=7, dtype=dtype)
  x_BxHxWxC = jnp.ones((3, 28, 28, 1))
  variables = model.init(jax.random.key(0), x_BxHxWxC, train=False)
  # Every parameter carries logical axis names for the sharding rules.
  is_boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
  boxed = jax.tree.leaves(variables["params"], is_leaf=is_boxed)
  assert boxed and all(isinstance(p, nn.LogicallyPartitioned) for p in boxed)
  variables = nn.meta.unbox(variables)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))  # fp32 parameters
  state = [k for k in variables if k != "params"]  # e.g. batch_stats
  logits, updated = model.apply(
    variables, x_BxHxWxC, train=True, rngs={"dropout": jax.random.key(1)}, mutable=state
  )
  assert logits.shape == (3, 7)
  assert logits.dtype == jnp.dtype(dtype) or name in ("resnet_cifar", "resnet", "vit")  # fp32
  assert set(updated) == set(state)


def test_dense_flattens_leading_axes_with_nn_denses_parameters_function_and_gradients():
  """layers.Dense: the matmul over (B*L, D) (for XLA:CPU's kernel gradient), otherwise
  nn.Dense: same parameter tree, outputs and gradients, for 3-D, 2-D and 1-D inputs."""
  for shape in [(3, 5, 4), (3, 4), (4,)]:
    x = jax.random.normal(jax.random.key(0), shape)
    ours, flax_dense = layers.Dense(6, name="fc"), nn.Dense(6, name="fc")
    params = flax_dense.init(jax.random.key(1), x)
    assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(params)
    y = ours.apply(params, x)
    assert y.shape == shape[:-1] + (6,)
    np.testing.assert_allclose(y, flax_dense.apply(params, x), rtol=1e-6, atol=1e-6)
    grad = lambda m: jax.grad(lambda p: jnp.sum(jnp.sin(m.apply(p, x))))(params)  # noqa: E731
    for got, want in zip(jax.tree.leaves(grad(ours)), jax.tree.leaves(grad(flax_dense)),
                         strict=True):  # fmt: skip
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "spec, x_shape, kernel_shape, axes",
  [("bld,dhk->blhk", (2, 5, 6), (6, 3, 4), 1), ("blhk,hkd->bld", (2, 5, 3, 4), (3, 4, 6), 2)],
)
def test_contract_is_the_einsum_with_its_gradients(spec, x_shape, kernel_shape, axes):
  """layers.contract (the attention projections' flattened matmul) equals the einsum
  it replaces, values and gradients for both arguments."""
  x = jax.random.normal(jax.random.key(0), x_shape)
  kernel = jax.random.normal(jax.random.key(1), kernel_shape)
  np.testing.assert_allclose(
    layers.contract(x, kernel, axes), jnp.einsum(spec, x, kernel), rtol=1e-5, atol=1e-5
  )
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))  # noqa: E731
  got = jax.grad(loss(lambda x, k: layers.contract(x, k, axes)), argnums=(0, 1))(x, kernel)
  want = jax.grad(loss(lambda x, k: jnp.einsum(spec, x, k)), argnums=(0, 1))(x, kernel)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dropout_is_active_only_in_training():
  model = registry.models.get("cnn")(num_classes=10)
  x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
  params = nn.meta.unbox(model.init(jax.random.key(0), x, train=False))
  eval_a = model.apply(params, x, train=False)
  eval_b = model.apply(params, x, train=False)
  train_a = model.apply(params, x, train=True, rngs={"dropout": jax.random.key(1)})
  train_b = model.apply(params, x, train=True, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.allclose(train_a, train_b)


def test_param_counts_match_the_architectures():
  def count(name, **kwargs):
    model = registry.models.get(name)(**kwargs)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 28, 28, 1))))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(variables)))

  assert count("softmax_regression") == 784 * 10 + 10
  assert count("mlp", widths=(128,)) == 784 * 128 + 128 + 128 * 10 + 10
  # Keras example: 320 + 18,496 + 1,179,776 + 1,290 = 1,199,882.
  assert count("cnn") == 1_199_882
  # LeNet-5 with a 10-way linear head: 156 + 2,416 + 48,120 + 10,164 + 850.
  assert count("lenet5") == 61_706
  # He et al. 2016, table 6: ResNet-20 has 0.27M parameters. Here 272,186 (with the
  # two option-B projections) plus 1,568 BatchNorm statistics (mean and variance).
  assert count("resnet_cifar", depth=20) == 272_186 + 1_568

  # ViT, 4x4 patches, width 128, 6 blocks, MLP 2x: patch embedding 16*128 + 128, class
  # token 128, positions 50*128, per block 2 norms + 4*128^2 attention + 2*128*256 MLP,
  # final norm 128, head 128*10 + 10.
  block = 2 * 128 + 4 * 128**2 + 2 * 128 * 256
  vit = dict(patch_size=4, num_layers=6, num_heads=4, embed_dim=128, mlp_ratio=2)
  assert count("vit", **vit) == 2_176 + 128 + 6_400 + 6 * block + 128 + 1_290 == 798_090
  assert count("vit", **vit, pool="mean") == 798_090 - 128 - 128  # no class token or its position
  assert count("vit", **vit, position_embedding="sincos2d") == 798_090 - 6_400  # fixed positions


@pytest.mark.parametrize(
  "depth, params", [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032), (101, 44_549_160)]
)
def test_imagenet_resnets_have_torchvisions_parameter_counts(depth, params):
  """torchvision.models.resnet{18,34,50,101}(): the same layers, so the same counts."""
  model = registry.models.get("resnet")(depth=depth, num_classes=1000)
  x = jnp.ones((1, 224, 224, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  assert sum(x.size for x in jax.tree.leaves(nn.meta.unbox(variables["params"]))) == params
  logits = jax.eval_shape(lambda v: model.apply(v, x), nn.meta.unbox(variables))
  assert logits.shape == (1, 1000)


def test_stochastic_depth_drops_whole_branches_per_example_only_in_training():
  branch = jnp.ones((1000, 4, 4, 2))
  drop = layers.DropPath(0.25)
  out = drop.apply({}, branch, True, rngs={"dropout": jax.random.key(0)})
  kept = np.asarray(out[:, 0, 0, 0]) > 0
  assert 0.7 < kept.mean() < 0.8  # about 75% of the examples keep their branch ...
  np.testing.assert_allclose(out[kept], 1 / 0.75)  # ... scaled so the mean is unchanged
  np.testing.assert_array_equal(out[~kept], 0.0)
  np.testing.assert_array_equal(drop.apply({}, branch, False), branch)
  # In the models: training outputs depend on the draw, evaluation does not.
  for name, kwargs in [("vit", dict(num_layers=2, embed_dim=32)), ("resnet_cifar", dict(depth=8))]:
    model = registry.models.get(name)(**kwargs, stochastic_depth=0.5)
    x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
    variables = nn.meta.unbox(model.init(jax.random.key(0), x))
    train = lambda key: model.apply(
      variables, x, train=True, rngs={"dropout": jax.random.key(key)}, mutable=["batch_stats"]
    )[0]  # fmt: skip
    assert not np.allclose(train(1), train(2)), name


def test_vit_remat_recomputes_each_block_in_the_backward_pass_and_changes_nothing():
  """model.remat on the ViT's encoder blocks, dropout and stochastic depth on: as for
  the LM (tests/test_transformer.py), but a whole block is recomputed, so per block 7
  matmuls ("full": q, k, v, the two attention matmuls, the attention's output, which the
  second norm's gradient reads, and the MLP's first) or 2 ("minimal")."""
  make = lambda **kw: registry.models.get("vit")(  # noqa: E731
    num_layers=2, embed_dim=16, num_heads=2, patch_size=7, dropout=0.1, stochastic_depth=0.2, **kw
  )
  images = jax.random.uniform(jax.random.key(0), (3, 28, 28, 1))
  assert recomputed_matmuls(make, images) == {"none": 0, "full": 7 * 2, "minimal": 2 * 2}


def test_vit_patches_are_row_major_and_see_the_whole_image():
  from research.models import vit

  x_BxHxWxC = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  patches_BxNxF = vit.patchify(x_BxHxWxC, 4)
  assert patches_BxNxF.shape == (2, 4, 48)
  np.testing.assert_array_equal(patches_BxNxF[1, 1].reshape(4, 4, 3), x_BxHxWxC[1, :4, 4:])
  # Full attention: changing the last patch changes the class-token output.
  model = registry.models.get("vit")(num_layers=1, embed_dim=16, num_heads=2, patch_size=4)
  variables = model.init(jax.random.key(0), x_BxHxWxC, train=False)
  y = model.apply(variables, x_BxHxWxC)
  assert not np.allclose(y, model.apply(variables, x_BxHxWxC.at[:, 4:, 4:].add(1.0)))


def test_sincos2d_positions_encode_row_and_column():
  from research.models import vit

  pe_MxD = np.asarray(vit.sincos_2d(3, 5, 16))
  assert pe_MxD.shape == (15, 16)
  # Position (row 0, column 0): sin 0 = 0 and cos 0 = 1 in each quarter.
  np.testing.assert_allclose(pe_MxD[0], [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4, atol=1e-7)
  # Row-major positions: index 7 is row 1, column 2; the fastest frequency is 1 radian.
  np.testing.assert_allclose(pe_MxD[7, [0, 4, 8, 12]], [np.sin(2), np.cos(2), np.sin(1), np.cos(1)])
  assert len({tuple(np.round(row, 5)) for row in pe_MxD}) == 15  # every position distinct
  with pytest.raises(ValueError, match="multiple of 4"):
    vit.sincos_2d(2, 2, 18)
  model = registry.models.get("vit")(num_layers=1, embed_dim=16, num_heads=2, patch_size=4,
                                     position_embedding="sincos2d", pool="mean")  # fmt: skip
  x_BxHxWxC = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  variables = model.init(jax.random.key(0), x_BxHxWxC, train=False)
  assert "position_embedding" not in variables["params"]
  # Mean pooling is permutation-invariant: only the positions tell swapped patches apart.
  swapped = jnp.concatenate([x_BxHxWxC[:, :, 4:], x_BxHxWxC[:, :, :4]], axis=2)
  assert not np.allclose(model.apply(variables, x_BxHxWxC), model.apply(variables, swapped))
  with pytest.raises(ValueError, match="position_embedding='rope'"):
    registry.models.get("vit")(position_embedding="rope").init(jax.random.key(0), x_BxHxWxC)


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
@pytest.mark.parametrize("kernel_size", [1, 3, 5])
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("channels", [3, 1])
def test_conv_is_flax_conv_with_its_parameters_and_gradients(
  padding, kernel_size, strides, channels
):
  conv = layers.conv(6, kernel_size, padding, "float32", strides=strides)
  flax_conv = nn.Conv(6, (kernel_size, kernel_size), strides, padding)
  x = jax.random.normal(jax.random.key(0), (2, 9, 11, channels))
  params = nn.meta.unbox(conv.init(jax.random.key(1), x))
  # One input channel on the CPU: patches @ kernel (layers.conv_as_matmul), no convolution.
  as_matmul = channels in layers.PATCH_CONV_IN_FEATURES.get(jax.default_backend(), ())
  assert as_matmul == (jax.default_backend() == "cpu" and channels == 1)
  assert ("conv_general_dilated" in str(jax.make_jaxpr(conv.apply)(params, x))) != as_matmul
  # Checkpoints of either load into the other: same names, shapes and dtypes.
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
    jnp.shape, flax_conv.init(jax.random.key(1), x)
  )
  np.testing.assert_allclose(conv.apply(params, x), flax_conv.apply(params, x), atol=1e-5)
  weights = jax.random.normal(jax.random.key(2), conv.apply(params, x).shape)
  loss = lambda apply: lambda p, x: jnp.sum(jnp.tanh(apply(p, x)) * weights)  # noqa: E731
  ours = jax.jit(jax.grad(loss(conv.apply), argnums=(0, 1)))(params, x)
  theirs = jax.grad(loss(flax_conv.apply), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="valid: SAME, VALID"):
    layers.conv(6, 3, "CIRCULAR", "float32").init(jax.random.key(1), x)


def _embed_grad_reference(ids, weights, dtype, shape):
  """The table's gradient as a float64 sum (numpy) of the lookup's cotangent, which is
  `weights` rounded to the compute dtype."""
  want = np.zeros(shape)
  dy = np.asarray(weights.astype(dtype), np.float64).reshape(-1, shape[1])
  np.add.at(want, np.asarray(ids).reshape(-1), dy)
  return want


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("vocab", [65, layers.ONE_HOT_GRAD_MAX_VOCAB + 1])
def test_embed_gradient_is_a_one_hot_matmul_for_small_vocabularies(dtype, vocab):
  ids = jax.random.randint(jax.random.key(0), (4, 300), 0, vocab)  # ~18 uses per row at 65
  ours, flax_embed = layers.Embed(vocab, 16, dtype=dtype), nn.Embed(vocab, 16, dtype=dtype)
  params = flax_embed.init(jax.random.key(1), ids)
  # The same parameters (checkpoints of either load into the other) and the same forward.
  assert jax.tree.structure(ours.init(jax.random.key(1), ids)) == jax.tree.structure(params)
  np.testing.assert_array_equal(ours.apply(params, ids), flax_embed.apply(params, ids))
  weights = jax.random.normal(jax.random.key(2), (4, 300, 16))
  loss = lambda m: lambda p: jnp.sum(m.apply(p, ids).astype(jnp.float32) * weights)  # noqa: E731
  grad = jax.jit(jax.grad(loss(ours)))
  table = params["params"]["embedding"]
  got = grad(params)["params"]["embedding"]
  assert got.dtype == table.dtype
  scatters = grad.lower(params).as_text().count('"stablehlo.scatter"')
  if vocab > layers.ONE_HOT_GRAD_MAX_VOCAB:  # on the CPU: Flax's lookup and gradient (a scatter)
    assert layers.embed_grad_method(vocab) == "scatter"
    assert scatters == 1
    want = jax.grad(loss(flax_embed))(params)["params"]["embedding"]
    np.testing.assert_array_equal(got, want)
    return
  assert scatters == 0
  # Flax's scatter adds in bf16; ours in float32, rounded once to the compute dtype.
  want = _embed_grad_reference(ids, weights, dtype, table.shape)
  tolerance = 1e-5 if dtype == jnp.float32 else 2**-8
  np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sorted_embed_gradient_sums_each_row_without_a_scatter(dtype):
  # GPT-2's table with the few rows a character corpus uses (many tokens per row: the
  # case a GPU's scatter-add serialises on), one row never used, and both ends.
  rows, width = 3000, 16
  ids = jax.random.choice(jax.random.key(0), jnp.array([0, 3, 4, 64, 2999]), (4, 300))
  table = jax.random.normal(jax.random.key(1), (rows, width), dtype)
  weights = jax.random.normal(jax.random.key(2), (4, 300, width))

  def loss(table_VxD):
    return jnp.sum(layers.take_rows(table_VxD, ids, "sorted").astype(jnp.float32) * weights)

  grad = jax.jit(jax.grad(loss))
  assert '"stablehlo.scatter"' not in grad.lower(table).as_text()
  got = grad(table)
  assert got.dtype == table.dtype
  want = _embed_grad_reference(ids, weights, dtype, table.shape)
  tolerance = 1e-5 if dtype == jnp.float32 else 2**-8
  np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
  assert not np.any(np.asarray(got)[[1, 2, 5, 2998]])  # rows no token used
  np.testing.assert_array_equal(layers.take_rows(table, ids, "sorted"), jnp.take(table, ids, 0))
  # Ids outside the table are dropped, as by XLA's scatter.
  sums = layers.sorted_segment_sum(jnp.array([1, 5, 1, -1]), jnp.ones((4, 2)), 3)
  np.testing.assert_array_equal(sums, [[0, 0], [2, 2], [0, 0]])
  with pytest.raises(ValueError, match="valid: one_hot, sorted"):
    layers.take_rows(table, ids, "scatter")


def test_embed_grad_method_sorts_on_a_gpu_only_above_the_one_hot_size(monkeypatch):
  assert layers.embed_grad_method(layers.ONE_HOT_GRAD_MAX_VOCAB) == "one_hot"
  assert layers.embed_grad_method(50_304) == "scatter"  # this CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert layers.embed_grad_method(layers.ONE_HOT_GRAD_MAX_VOCAB) == "one_hot"
  assert layers.embed_grad_method(50_304) == "sorted"


def test_dropout_masks_four_elements_per_random_word_with_nn_dropouts_expectation():
  ones = jnp.ones((4000, 37))  # a width that is no multiple of four
  drop = lambda rate, key=0, x=ones: layers.Dropout(rate).apply(  # noqa: E731
    {}, x, deterministic=False, rngs={"dropout": jax.random.key(key)}
  )
  out = np.asarray(drop(0.25))
  kept = out > 0
  np.testing.assert_array_equal(out[kept], np.float32(1 / 0.75))  # exact: 0.75 = 192/256
  np.testing.assert_array_equal(out[~kept], 0.0)
  assert abs(kept.mean() - 0.75) < 0.005
  # Every byte of a word, so every column, keeps at the rate; neighbours independently.
  assert np.all(np.abs(kept.mean(axis=0) - 0.75) < 0.03)
  assert abs((kept[:, 0::4][:, :9] & kept[:, 1::4]).mean() - 0.75**2) < 0.01
  np.testing.assert_array_equal(drop(0.25), out)  # a function of the key ...
  assert (np.asarray(drop(0.25, key=1)) != out).mean() > 0.3  # ... that changes with it
  # A rate that is no multiple of 1/256 takes 16 bits: the probability within 2^-17.
  keep, prob = layers.dropout_mask(jax.random.key(0), (4000, 37), 0.1)
  assert abs(prob - 0.9) <= 2**-17 and abs(float(keep.mean()) - 0.9) < 0.005
  out = np.asarray(drop(0.1))
  np.testing.assert_allclose(out[out > 0], 1 / prob, rtol=1e-6)  # scaled by what it keeps
  assert np.mean(np.asarray(drop(0.1, x=jnp.ones((200_000,))))) == pytest.approx(1.0, abs=0.01)
  # The identity when deterministic or at rate 0; a scalar input; bad rates.
  np.testing.assert_array_equal(layers.Dropout(0.5).apply({}, ones, deterministic=True), ones)
  np.testing.assert_array_equal(drop(0.0), ones)
  assert drop(0.5, x=jnp.ones(())).shape == ()
  with pytest.raises(ValueError, match="valid: 0 <= rate < 1"):
    layers.dropout_mask(jax.random.key(0), (3,), 1.5)
  np.testing.assert_array_equal(drop(1.0), 0.0)


def test_dropout_mask_is_the_same_split_over_devices():
  """The mask depends on the key and the shape only: sharded over the batch or the
  packed last axis on 8 devices, it equals the unsharded one."""
  code = """
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from research.models import layers
    x = jax.numpy.ones((16, 6, 64))
    drop = jax.jit(lambda x, key: layers.Dropout(0.25).apply(
      {}, x, deterministic=False, rngs={"dropout": key}))
    key = jax.random.key(3)
    whole = drop(x, key)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    for spec in (P("data", None, "model"), P(("data", "model"))):
      split = drop(jax.device_put(x, NamedSharding(mesh, spec)), key)
      assert len(split.sharding.device_set) == 8
      np.testing.assert_array_equal(split, whole)
    print("ok")
  """
  env = dict(os.environ, XLA_FLAGS=devices_flags(8))
  code = textwrap.dedent(code)
  run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
