"""research.profiling.StepTrace: where the loop's calls stop, and the order of waits."""

from __future__ import annotations

import ml_collections

from research import profiling


def _trace(tmp_path, start_step, num_steps, first_step=0, enabled=True):
  profile = ml_collections.ConfigDict(dict(start_step=start_step, num_steps=num_steps))
  return profiling.StepTrace(profile, tmp_path / "tb", first_step, enabled=enabled)


def test_edges_are_where_calls_stop_in_the_loops_terms(tmp_path):
  trace = _trace(tmp_path, start_step=4, num_steps=3)  # the log's steps 4-6: calls from 3 to 6
  assert trace.edges(0) == [3, 6]
  assert trace.edges(3) == [6]
  assert trace.edges(6) == []
  assert _trace(tmp_path, 0, 3).edges(0) == []  # 0: no profile
  other_process = _trace(tmp_path, 4, 3, enabled=False)  # stops its calls there too
  assert other_process.edges(0) == [3, 6]
  other_process.before(3, None)
  assert other_process.started_at is None  # but does not trace


def test_trace_waits_for_dispatched_steps_before_it_begins_and_its_own_before_it_ends(
  tmp_path, monkeypatch
):
  import jax

  events = []
  monkeypatch.setattr(jax, "block_until_ready", lambda x: events.append(("wait", x)))
  monkeypatch.setattr(jax.profiler, "start_trace", lambda logdir: events.append(("start",)))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: events.append(("stop",)))
  trace = _trace(tmp_path, start_step=2, num_steps=2)
  trace.before(0, "sums@0")
  assert trace.after(1, "sums@1") == 0.0 and events == []
  trace.before(1, "sums@1")
  assert events == [("wait", "sums@1"), ("start",)]
  trace.after(2, "sums@2")  # the first traced step ends: the trace goes on
  trace.before(2, "sums@2")
  assert trace.after(3, "sums@3") >= 0.0
  assert events == [("wait", "sums@1"), ("start",), ("wait", "sums@3"), ("stop",)]
  trace.stop()  # the loop's `finally`: nothing more once stopped
  assert events[-1] == ("stop",) and len(events) == 4


def test_a_run_resumed_after_the_steps_traces_nothing(tmp_path):
  trace = _trace(tmp_path, start_step=3, num_steps=2, first_step=3)  # step 3 already done
  assert trace.edges(3) == []
  trace.before(3, None)
  assert trace.started_at is None
  resumed_before = _trace(tmp_path, start_step=3, num_steps=2, first_step=2)
  assert resumed_before.edges(2) == [4]
