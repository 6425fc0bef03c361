"""research: a JAX framework for research experiments.

Importing this package is cheap: JAX, TensorFlow and TFDS load only in the
modules that use them.
"""

__version__ = "0.1.0"
