"""research: a JAX framework for research experiments.

Importing this package is cheap: JAX, TensorFlow and TFDS load only in the
modules that use them. It sets the framework's default XLA CPU flags in
$XLA_FLAGS before any JAX backend starts (research/runtime.py; off with
RESEARCH_XLA_DEFAULTS=0).
"""

from research import runtime as _runtime

__version__ = "0.1.0"

_runtime.apply_xla_defaults()
