"""XLA_FLAGS for the processes a test starts with a flag set of its own."""

from __future__ import annotations

import os

OPT_LEVEL = "--xla_backend_optimization_level"


def devices_flags(devices: int) -> str:
  """XLA_FLAGS for `devices` CPU devices at this session's LLVM level (-O1, set by
  conftest, unless $XLA_FLAGS set another): such processes compile as fast as the rest."""
  level = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith(OPT_LEVEL)]
  return " ".join([f"--xla_force_host_platform_device_count={devices}", *level])
