"""Process-wide JAX settings the framework applies by default (each can be turned off).

1. XLA CPU flags (`apply_xla_defaults`, run when `research` is imported, before
   any backend starts): YNNPACK kernels for dot, convolution, elementwise and
   reduction fusions. Measured by `python -m research.bench` on a 2-core CPU:
   the Keras MNIST CNN's train step is ~1.5x faster (XLA's own CPU convolution
   reaches ~50 GFLOP/s where YNNPACK's reaches ~200), results equal to float32
   rounding (~1e-7 relative). Only for jaxlib versions where the flag was tested
   (an unknown XLA flag aborts the process). Off with RESEARCH_XLA_DEFAULTS=0;
   a flag the user sets in XLA_FLAGS wins.
2. JAX's persistent compilation cache (`enable_compilation_cache`, called by
   the entry points): compiled programs are kept on disk, so the second start
   of a run (a resume, a sweep's next point, an evaluation) skips compilation.
   Directory: $RESEARCH_COMPILATION_CACHE, else ~/.cache/research/jax; "off"
   disables it.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

CPU_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "dot,eltwise,reduce"}
TESTED_JAXLIB = ((0, 10, 2), (0, 13, 0))  # [first, last) versions known to parse CPU_FLAGS


def _version_tuple(text: str) -> tuple[int, ...]:
  parts = []
  for piece in text.split(".")[:3]:
    digits = "".join(c for c in piece if c.isdigit())
    parts.append(int(digits or 0))
  return tuple(parts)


def xla_defaults_apply() -> bool:
  if os.environ.get("RESEARCH_XLA_DEFAULTS", "1").lower() in ("0", "false", "off"):
    return False
  try:
    version = _version_tuple(importlib.metadata.version("jaxlib"))
  except importlib.metadata.PackageNotFoundError:
    return False
  return TESTED_JAXLIB[0] <= version < TESTED_JAXLIB[1]


def apply_xla_defaults() -> None:
  """Appends CPU_FLAGS to $XLA_FLAGS (those the user has not set). Cheap: imports no JAX."""
  if not xla_defaults_apply():
    return
  current = os.environ.get("XLA_FLAGS", "")
  added = [f"--{name}={value}" for name, value in CPU_FLAGS.items() if f"--{name}" not in current]
  if added:
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()


def compilation_cache_dir() -> Path | None:
  setting = os.environ.get("RESEARCH_COMPILATION_CACHE", "")
  if setting.lower() in ("off", "0", "none", "false"):
    return None
  return Path(setting).expanduser() if setting else Path("~/.cache/research/jax").expanduser()


def enable_compilation_cache(directory: str | Path | None = None) -> Path | None:
  """Turns on JAX's persistent compilation cache (every program, however quick to
  compile); returns its directory, or None when disabled."""
  import jax

  directory = Path(directory) if directory else compilation_cache_dir()
  if directory is None:
    return None
  directory.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory
