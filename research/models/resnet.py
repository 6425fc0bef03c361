"""ResNets with BatchNorm: CIFAR-style ResNet-20/32/56 (He et al. 2016, section 4.2).

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


class BasicBlock(nn.Module):
  """conv3x3 - BN - ReLU - conv3x3 - BN, plus the shortcut (a 1x1 projection when the
  shape changes: the paper's option B), then ReLU."""

  features: int
  strides: int
  dtype: str

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool) -> jax.Array:
    conv = lambda f, k, s, name: layers.conv(f, k, "SAME", self.dtype, name, s, use_bias=False)  # noqa: E731
    y = conv(self.features, 3, self.strides, "conv1")(x_BxHxWxC)
    y = nn.relu(batch_norm(train, "bn1")(y))
    y = conv(self.features, 3, 1, "conv2")(y.astype(x_BxHxWxC.dtype))
    y_BxHxWxF = batch_norm(train, "bn2")(y)
    shortcut = x_BxHxWxC
    if self.strides != 1 or x_BxHxWxC.shape[-1] != self.features:
      shortcut = conv(self.features, 1, self.strides, "projection")(x_BxHxWxC)
      shortcut = batch_norm(train, "projection_bn")(shortcut)
    return nn.relu(y_BxHxWxF + shortcut).astype(x_BxHxWxC.dtype)


@registry.models.register("resnet_cifar")
class CifarResNet(nn.Module):
  """ResNet-(6n+2) for small images: conv16, then 3 stages of n blocks (16, 32, 64
  features, stride 2 into stages 2 and 3), global average pooling, dense K."""

  depth: int = 20
  width: int = 16
  num_classes: int = 10
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
        x = BasicBlock(
          self.width * 2**stage, strides, self.dtype, name=f"stage{stage + 1}_block{block + 1}"
        )(x, train)
    x_BxF = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return layers.dense(self.num_classes, ("embed", "classes"), self.dtype, "head")(x_BxF)
