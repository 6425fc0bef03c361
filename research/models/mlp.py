"""Softmax regression and multi-layer perceptrons.

Shapes: B batch, H height, W width, C channels, D flattened input, F hidden
features, K classes.
"""

from __future__ import annotations

from collections.abc import Sequence

from flax import linen as nn

from research import registry
from research.models import layers


@registry.models.register("softmax_regression")
class SoftmaxRegression(nn.Module):
  """Multinomial logistic regression: one Dense layer on the flattened input."""

  num_classes: int = 10
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BxHxWxC, *, train: bool = False):
    del train
    x_BxD = layers.flatten(x_BxHxWxC).astype(layers.compute_dtype(self.dtype))
    return layers.dense(self.num_classes, ("embed", "classes"), self.dtype, "head")(x_BxD)


@registry.models.register("mlp")
class MLP(nn.Module):
  """Dense layers of `widths`, each followed by `activation` and dropout."""

  widths: Sequence[int] = (128,)
  activation: str = "relu"
  dropout: float = 0.0
  num_classes: int = 10
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BxHxWxC, *, train: bool = False):
    act = layers.activation(self.activation)
    x_BxF = layers.flatten(x_BxHxWxC).astype(layers.compute_dtype(self.dtype))
    for i, width in enumerate(self.widths):
      # Alternate (embed, mlp), (mlp, embed) as Megatron does: with mlp sharded over
      # `model`, consecutive layers need no all-gather in between.
      axes = ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed")
      x_BxF = act(layers.dense(width, axes, self.dtype, f"hidden_{i}")(x_BxF))
      x_BxF = layers.Dropout(self.dropout, deterministic=not train)(x_BxF)
    head_in = "mlp" if len(self.widths) % 2 else "embed"
    return layers.dense(self.num_classes, (head_in, "classes"), self.dtype, "head")(x_BxF)
