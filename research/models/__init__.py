"""Flax linen models, registered by name in `research.registry.models`."""

from research.models import cnn, mlp, resnet, seq2seq, transformer, vit  # noqa: F401  (registers)
