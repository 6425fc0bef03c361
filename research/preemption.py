"""When to stop for a preemption: SIGTERM, at a step boundary every process agrees on.

One process: a SIGTERM handler sets a flag that the loop reads after each step.
Several processes: JAX's preemption sync point (set up by jax.distributed,
which also listens for SIGTERM) picks the same step on all of them, so they
save one consistent checkpoint together.
"""

from __future__ import annotations

import signal

import jax
from absl import logging


class PreemptionWatcher:
  def __init__(self):
    self._signalled = False
    self._previous = None
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      except ValueError:  # not the main thread (e.g. a test runner's worker): no handler
        logging.warning("SIGTERM handler not installed: not running in the main thread")

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._signalled = True

  def should_stop(self, call: int) -> bool:
    """`call`: 1, 2, ... for each train call since the process started, asked after every
    one (JAX's sync point is the id after the highest any process reported: an id the
    loop skipped would never match)."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      return multihost_utils.reached_preemption_sync_point(call)
    return self._signalled

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
