"""Small convolutional networks for 28x28 images.

Shapes: B batch, H height, W width, C channels, F features, K classes.
"""

from __future__ import annotations

from flax import linen as nn

from research import registry
from research.models import layers


@registry.models.register("lenet5")
class LeNet5(nn.Module):
  """LeCun et al. 1998: conv6(5x5) - pool - conv16(5x5) - pool - 120 - 84 - K.

  28x28 inputs are padded by 2 (SAME) in the first convolution to match the
  original 32x32 input; pooling is average pooling as in the paper.
  """

  activation: str = "tanh"
  num_classes: int = 10
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BxHxWxC, *, train: bool = False):
    del train
    act = layers.activation(self.activation)
    x = x_BxHxWxC.astype(layers.compute_dtype(self.dtype))
    x_Bx28x28x6 = act(layers.conv(6, 5, "SAME", self.dtype, "conv1")(x))
    x_Bx14x14x6 = nn.avg_pool(x_Bx28x28x6, (2, 2), (2, 2))
    x_Bx10x10x16 = act(layers.conv(16, 5, "VALID", self.dtype, "conv2")(x_Bx14x14x6))
    x_Bx5x5x16 = nn.avg_pool(x_Bx10x10x16, (2, 2), (2, 2))
    x_BxF = layers.flatten(x_Bx5x5x16)
    x_BxF = act(layers.dense(120, ("embed", "mlp"), self.dtype, "fc1")(x_BxF))
    x_BxF = act(layers.dense(84, ("mlp", "embed"), self.dtype, "fc2")(x_BxF))
    return layers.dense(self.num_classes, ("embed", "classes"), self.dtype, "head")(x_BxF)


@registry.models.register("cnn")
class KerasCNN(nn.Module):
  """The Keras MNIST example: conv32-conv64-pool-dropout-dense128-dropout-dense K."""

  conv_features: tuple[int, int] = (32, 64)
  dense_features: int = 128
  conv_dropout: float = 0.25
  dense_dropout: float = 0.5
  num_classes: int = 10
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BxHxWxC, *, train: bool = False):
    x = x_BxHxWxC.astype(layers.compute_dtype(self.dtype))
    for i, features in enumerate(self.conv_features):
      x = nn.relu(layers.conv(features, 3, "VALID", self.dtype, f"conv{i + 1}")(x))
    x_BxHxWxF = layers.max_pool_2x2(x)
    x_BxHxWxF = layers.Dropout(self.conv_dropout, deterministic=not train)(x_BxHxWxF)
    x_BxF = layers.flatten(x_BxHxWxF)
    x_BxF = nn.relu(layers.dense(self.dense_features, ("embed", "mlp"), self.dtype, "fc1")(x_BxF))
    x_BxF = layers.Dropout(self.dense_dropout, deterministic=not train)(x_BxF)
    return layers.dense(self.num_classes, ("mlp", "classes"), self.dtype, "head")(x_BxF)
