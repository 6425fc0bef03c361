"""A profile of chosen train steps: `config.profile` (MaxText's `profiler_steps`).

`research.train` with `--config.profile.start_step=S` records JAX's profiler
(`jax.profiler.start_trace`) over train steps S to S + num_steps - 1, numbered as
the log numbers them (step 1 is the first, which compiles), into
`WORKDIR/tensorboard/plugins/profile/<time>/`: an `.xplane.pb` for TensorBoard's
profile tab or XProf, and a `.trace.json.gz` for Perfetto (ui.perfetto.dev). The
loop's calls stop at both edges, and the loop waits for the steps dispatched before
the trace begins (JAX dispatches ahead: without the wait, a CNN's first traced step
took 1.8 s, the ~17 queued steps before it, against 0.1 s) and for its last step
before it ends, so the trace holds exactly those steps. Process 0 traces its own
devices. The train log's speed over those steps includes the profiler's overhead, not
the writing of the trace.
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import logging


class StepTrace:
  """Starts and stops the trace around the loop's calls (`before`, `after`)."""

  def __init__(self, profile_config, logdir: Path, first_step: int, enabled: bool = True):
    """`first_step`: the steps done before this run (a resumed run's checkpoint)."""
    # In the loop's terms: from the call that starts at `start` to the one ending at `end`.
    self.start = profile_config.start_step - 1
    self.end = self.start + profile_config.num_steps
    self.logdir = Path(logdir)
    self.started_at = None  # perf_counter() while tracing, else None
    # Every process stops its calls at the edges (they must run the same calls: the
    # steps' collectives and the preemption sync point), and `enabled` ones trace.
    self.wanted = self.start >= 0
    self.enabled = enabled
    if self.wanted and first_step > self.start:
      logging.warning(
        "config.profile: steps %d-%d came before this run, which resumed after step %d; "
        "nothing traced", self.start + 1, self.end, first_step,
      )  # fmt: skip
      self.wanted = False

  def edges(self, step: int) -> list[int]:
    """Steps after `step` where a call must stop for the trace to begin or end there."""
    return [edge for edge in (self.start, self.end) if self.wanted and edge > step]

  def before(self, step: int, outputs) -> None:
    """Called before the call that runs from `step`, with the outputs of the calls
    already dispatched: the trace waits for them, else it would time their steps too."""
    if self.wanted and self.enabled and step == self.start and self.started_at is None:
      import jax

      jax.block_until_ready(outputs)
      self.logdir.mkdir(parents=True, exist_ok=True)
      self.existing = set(self.logdir.glob("plugins/profile/*"))
      jax.profiler.start_trace(str(self.logdir))
      self.started_at = time.perf_counter()

  def after(self, done: int, outputs) -> float:
    """Called after the call that ends at `done` (its `outputs` not yet computed);
    returns the seconds spent writing a finished trace (0 if none)."""
    if self.started_at is None or done < self.end:
      return 0.0
    import jax

    jax.block_until_ready(outputs)  # the last traced step runs inside the trace
    stopping = time.perf_counter()
    seconds = stopping - self.started_at
    self.stop()
    written = sorted(set(self.logdir.glob("plugins/profile/*")) - self.existing)
    logging.info(
      "[TIMING] profile of steps %d-%d: %.3fs (%.1f ms/step, the profiler's overhead "
      "included) in %s", self.start + 1, self.end, seconds,
      1e3 * seconds / (self.end - self.start), written[-1] if written else self.logdir,
    )  # fmt: skip
    return time.perf_counter() - stopping

  def stop(self) -> None:
    """Ends a trace in progress (also when the loop stops early)."""
    if self.started_at is not None:
      import jax

      jax.profiler.stop_trace()
      self.started_at = None
      self.wanted = False
