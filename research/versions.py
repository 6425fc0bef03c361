"""Library versions, recorded in every checkpoint, config.json and results file."""

from __future__ import annotations

import importlib.metadata
import platform

PACKAGES = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "ml-collections",
  "numpy",
  "tensorflow-datasets",
  "tensorflow-cpu",
  "tensorflow",
  "sentencepiece",
  "sacrebleu",
  "scikit-learn",
  "matplotlib",
)


def versions() -> dict[str, str]:
  import research

  found = {"python": platform.python_version(), "research": research.__version__}
  for package in PACKAGES:
    try:
      found[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found
