"""ResNets with BatchNorm (He et al. 2016): CIFAR-style ResNet-20/32/56 (section
4.2) and ImageNet-style ResNet-18/34/50/101/152 (table 1; torchvision's layout,
stride in the bottleneck's 3x3 convolution: "ResNet v1.5").

Shapes: B batch, H height, W width, C channels, F features, K classes.

BatchNorm statistics are model state ("batch_stats"), kept in the TrainState
beside the parameters and checkpointed with them. Under jit over a mesh the
batch axis is one global array, so the statistics of a step are those of the
whole global batch on any number of devices (no cross-device op to write).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from research import registry
from research.models import layers


def batch_norm(train: bool, name: str, zero_scale: bool = False) -> nn.BatchNorm:
  scale = nn.initializers.zeros_init() if zero_scale else nn.initializers.ones_init()
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    dtype=jnp.float32,
    scale_init=nn.with_logical_partitioning(scale, ("conv_out",)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
    name=name,
  )


def _conv(features, kernel, strides, dtype, name):
  return layers.conv(features, kernel, "SAME", dtype, name, strides, use_bias=False)


class BasicBlock(nn.Module):
  """conv3x3 - BN - ReLU - conv3x3 - BN, plus the shortcut (a 1x1 projection when the
  shape changes: the paper's option B), then ReLU. `drop_path`: stochastic depth."""

  features: int
  strides: int
  dtype: str
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool) -> jax.Array:
    y = _conv(self.features, 3, self.strides, self.dtype, "conv1")(x_BxHxWxC)
    y = nn.relu(batch_norm(train, "bn1")(y))
    y = _conv(self.features, 3, 1, self.dtype, "conv2")(y.astype(x_BxHxWxC.dtype))
    y_BxHxWxF = layers.DropPath(self.drop_path)(batch_norm(train, "bn2")(y), train)
    return nn.relu(y_BxHxWxF + _shortcut(self, x_BxHxWxC, self.features, train))


def _shortcut(block, x_BxHxWxC, features, train):
  if block.strides == 1 and x_BxHxWxC.shape[-1] == features:
    return x_BxHxWxC.astype(jnp.float32)
  shortcut = _conv(features, 1, block.strides, block.dtype, "projection")(x_BxHxWxC)
  return batch_norm(train, "projection_bn")(shortcut)


class Bottleneck(nn.Module):
  """conv1x1 (F) - conv3x3 (F, strided) - conv1x1 (4F), BN after each, ReLU between;
  shortcut as in BasicBlock; the last BN starts at zero scale (Goyal et al. 2017)."""

  features: int
  strides: int
  dtype: str
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool) -> jax.Array:
    dtype = x_BxHxWxC.dtype
    y = nn.relu(
      batch_norm(train, "bn1")(_conv(self.features, 1, 1, self.dtype, "conv1")(x_BxHxWxC))
    )
    y = _conv(self.features, 3, self.strides, self.dtype, "conv2")(y.astype(dtype))
    y = nn.relu(batch_norm(train, "bn2")(y))
    y = _conv(4 * self.features, 1, 1, self.dtype, "conv3")(y.astype(dtype))
    y_BxHxWxF = layers.DropPath(self.drop_path)(batch_norm(train, "bn3", zero_scale=True)(y), train)
    return nn.relu(y_BxHxWxF + _shortcut(self, x_BxHxWxC, 4 * self.features, train))


@registry.models.register("resnet_cifar")
class CifarResNet(nn.Module):
  """ResNet-(6n+2) for small images: conv16, then 3 stages of n blocks (16, 32, 64
  features, stride 2 into stages 2 and 3), global average pooling, dense K."""

  depth: int = 20
  width: int = 16
  num_classes: int = 10
  stochastic_depth: float = 0.0  # drop rate of the last block; earlier blocks scale linearly
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
    if (self.depth - 2) % 6:
      raise ValueError(f"model.depth={self.depth}: CIFAR ResNets have depth 6n+2 (20, 32, 56, ...)")
    blocks = (self.depth - 2) // 6
    x = x_BxHxWxC.astype(layers.compute_dtype(self.dtype))
    x = layers.conv(self.width, 3, "SAME", self.dtype, "stem", use_bias=False)(x)
    x = nn.relu(batch_norm(train, "stem_bn")(x)).astype(layers.compute_dtype(self.dtype))
    for stage in range(3):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        rate = self.stochastic_depth * (stage * blocks + block + 1) / (3 * blocks)
        x = BasicBlock(
          self.width * 2**stage, strides, self.dtype, rate,
          name=f"stage{stage + 1}_block{block + 1}",
        )(x, train).astype(x.dtype)  # fmt: skip
    x_BxF = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return layers.dense(self.num_classes, ("embed", "classes"), self.dtype, "head")(x_BxF)


IMAGENET_STAGES = {  # depth: (block, blocks per stage)
  18: (BasicBlock, (2, 2, 2, 2)),
  34: (BasicBlock, (3, 4, 6, 3)),
  50: (Bottleneck, (3, 4, 6, 3)),
  101: (Bottleneck, (3, 4, 23, 3)),
  152: (Bottleneck, (3, 8, 36, 3)),
}


@registry.models.register("resnet")
class ResNet(nn.Module):
  """ImageNet-style ResNet-18/34/50/101/152: conv7x7/2 (64) - BN - ReLU - max pool 3x3/2,
  4 stages (64, 128, 256, 512 features; x4 out of bottlenecks; stride 2 into stages
  2-4), global average pooling, dense K."""

  depth: int = 50
  width: int = 64
  num_classes: int = 1000
  stochastic_depth: float = 0.0
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
    if self.depth not in IMAGENET_STAGES:
      valid = ", ".join(map(str, IMAGENET_STAGES))
      raise ValueError(f"model.depth={self.depth}: valid: {valid}")
    block_type, stages = IMAGENET_STAGES[self.depth]
    dtype = layers.compute_dtype(self.dtype)
    x = _conv(self.width, 7, 2, self.dtype, "stem")(x_BxHxWxC.astype(dtype))
    x = nn.relu(batch_norm(train, "stem_bn")(x)).astype(dtype)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    total, index = sum(stages), 0
    for stage, blocks in enumerate(stages):
      for block in range(blocks):
        index += 1
        strides = 2 if stage > 0 and block == 0 else 1
        x = block_type(
          self.width * 2**stage, strides, self.dtype, self.stochastic_depth * index / total,
          name=f"stage{stage + 1}_block{block + 1}",
        )(x, train).astype(dtype)  # fmt: skip
    x_BxF = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return layers.dense(self.num_classes, ("embed", "classes"), self.dtype, "head")(x_BxF)
