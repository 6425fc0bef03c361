"""End to end on real MNIST: learning, writers, checkpoints, exact resume, workdir safety."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from research import config as config_lib
from research import train
from research.metrics import read_jsonl


@pytest.fixture
def config(mnist, tfds_data_dir, mnist_raw_dir):
  """A small MLP with dropout on real MNIST (the session fixture has prepared it)."""
  del mnist
  config = config_lib.load_file(f"{config_lib.REPO_ROOT}/experiments/mnist_mlp.py")
  config.data.data_dir = tfds_data_dir
  config.data.raw_dir = mnist_raw_dir
  config.model.widths = (32,)
  config.global_batch_size = 64
  config.eval_batch_size = 500
  config.num_train_steps = 200
  config.log_every_steps = 50
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 60
  config.max_to_keep = 5
  return config


def test_training_learns_and_writes_everything(config, tmp_path):
  hooked = []
  final = train.train_and_evaluate(config, str(tmp_path), on_log=lambda *a: hooked.append(a))
  assert final["accuracy"] > 0.85
  records = read_jsonl(tmp_path / "metrics.jsonl")
  train_losses = [r["metrics"]["loss"] for r in records if r["split"] == "train"]
  assert [r["step"] for r in records if r["split"] == "train"] == [50, 100, 150, 200]
  assert [step for step, _ in hooked] == [50, 100, 150, 200]  # on_log: after each log line
  assert [metrics["loss"] for _, metrics in hooked] == train_losses
  assert train_losses[-1] < 0.6 * train_losses[0]  # loss falls
  evals = [r for r in records if r["split"] == "test"]
  assert [r["step"] for r in evals] == [100, 200]
  assert evals[-1]["metrics"]["accuracy"] == pytest.approx(final["accuracy"])
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["derived"]["total_steps"] == 200
  assert saved["derived"]["num_params"] == 784 * 32 + 32 + 32 * 10 + 10
  assert "jax" in saved["versions"] and "flax" in saved["versions"]
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [60, 120, 180, 200]
  from research.checkpoint import Checkpointer

  metadata = Checkpointer(tmp_path / "checkpoints", 5).metadata(200)
  assert (
    metadata["config"]["model"]["widths"] == [32] and "orbax-checkpoint" in metadata["versions"]
  )


def _final_params(workdir):
  import jax

  from research import checkpoint

  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", 5)
  step = ckpt.latest_step()
  import orbax.checkpoint as ocp

  restored = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  ckpt.close()
  return step, jax.tree.map(np.asarray, restored["state"]["params"])


def test_resume_continues_at_the_right_step_with_identical_state(config, tmp_path):
  straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
  final_straight = train.train_and_evaluate(config, str(straight))
  # A run killed after its step-120 save: same command, its later checkpoints lost.
  train.train_and_evaluate(config, str(interrupted))
  for step in ("180", "200"):
    shutil.rmtree(interrupted / "checkpoints" / step)
  final_resumed = train.train_and_evaluate(config, str(interrupted))
  assert final_resumed == final_straight
  step_a, params_a = _final_params(straight)
  step_b, params_b = _final_params(interrupted)
  assert step_a == step_b == 200
  for a, b in zip(
    __import__("jax").tree.leaves(params_a), __import__("jax").tree.leaves(params_b), strict=True
  ):
    np.testing.assert_array_equal(a, b)  # bitwise


def test_wsd_stable_phase_checkpoint_decayed_over_a_longer_budget_equals_that_run(config, tmp_path):
  """warmup_stable_decay's use in scaling studies: a checkpoint from the stable phase of
  an 80-step run, continued to 120 steps, ends with the parameters of a 120-step run,
  bit for bit (the rate before a decay does not depend on the budget, nor do the
  batches): resumed in its own workdir (--allow_config_change) or branched into a new
  one (config.init.mode="continue"), which leaves the source as it was."""
  config.schedule = config_lib.entry(
    "schedule", "warmup_stable_decay", warmup_steps=10, decay_fraction=0.25
  )
  config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps = 30, -1, 30
  config.max_to_keep, config.keep_every_steps = 1, 60
  config.num_train_steps = 120
  train.train_and_evaluate(config, str(tmp_path / "long"))
  _, long = _final_params(tmp_path / "long")
  config.num_train_steps = 80  # decays from step 60
  train.train_and_evaluate(config, str(tmp_path / "short"))
  assert sorted(p.name for p in (tmp_path / "short" / "checkpoints").iterdir()) == ["60", "80"]
  branch = config.copy_and_resolve_references()
  branch.num_train_steps = 120
  branch.init.checkpoint, branch.init.mode = (
    str(tmp_path / "short" / "checkpoints" / "60"),
    "continue",
  )
  train.train_and_evaluate(branch, str(tmp_path / "branch"))
  saved = json.loads((tmp_path / "branch" / "config.json").read_text())["derived"]["init"]
  assert saved["step"] == 60 and saved["mode"] == "continue"
  assert sorted(p.name for p in (tmp_path / "short" / "checkpoints").iterdir()) == ["60", "80"]
  shutil.rmtree(tmp_path / "short" / "checkpoints" / "80")  # resume from step 60
  config.num_train_steps = 120
  train.train_and_evaluate(config, str(tmp_path / "short"), allow_config_change=True)
  for workdir in ("branch", "short"):
    step, params = _final_params(tmp_path / workdir)
    assert step == 120
    for a, b in zip(jax.tree.leaves(long), jax.tree.leaves(params), strict=True):
      np.testing.assert_array_equal(a, b, err_msg=workdir)
  branch.model.widths = (16,)  # another model: one line before any step
  with pytest.raises(config_lib.ConfigError, match=r"does not fit this config's .* same model"):
    train.train_and_evaluate(branch, str(tmp_path / "other"))


def test_checkpoints_at_multiples_of_keep_every_steps_are_kept(config, tmp_path):
  config.num_train_steps, config.checkpoint_every_steps, config.max_to_keep = 100, 20, 2
  config.eval_every_steps, config.keep_every_steps = -1, 40
  train.train_and_evaluate(config, str(tmp_path))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [40, 80, 100]  # 40 and 80 for good, the latest two (80, 100)
  config.keep_every_steps = 30
  with pytest.raises(config_lib.ConfigError, match=r"keep_every_steps=30: must be 0 .* of config"):
    train.train_and_evaluate(config, str(tmp_path / "bad"))


def test_workdir_with_another_config_is_refused(config, tmp_path):
  config.num_train_steps = 20
  train.train_and_evaluate(config, str(tmp_path))
  before = (tmp_path / "config.json").read_text()
  config.optimizer.learning_rate = 0.5
  with pytest.raises(config_lib.ConfigError, match=r"optimizer.learning_rate: 0.001 -> 0.5"):
    train.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / "config.json").read_text() == before


def _traced_calls(workdir, function: str) -> list[int]:
  """Calls of the jitted `function` in each of the workdir's profiles (JAX's event
  `PjitFunction(NAME)`, nested ones counted once)."""
  import jax

  counts = []
  for path in sorted((workdir / "tensorboard").glob("plugins/profile/*/*.xplane.pb")):
    calls, open_until = 0, -1.0
    for plane in jax.profiler.ProfileData.from_file(str(path)).planes:
      for line in plane.lines:
        events = sorted(line.events, key=lambda e: e.start_ns)
        for event in (e for e in events if e.name == f"PjitFunction({function})"):
          if event.start_ns >= open_until:
            calls, open_until = calls + 1, event.start_ns + event.duration_ns
    counts.append(calls)
  return counts


def test_profile_traces_the_chosen_steps_and_changes_nothing(config, tmp_path, monkeypatch):
  """config.profile.start_step=4, num_steps=3: one trace in WORKDIR/tensorboard holding
  exactly three calls of the train step, and the run's results unchanged. A run resumed
  after those steps traces nothing, and the profile keys may change on resume. With
  several steps per call, the calls stop at the trace's edges."""
  config.num_train_steps, config.log_every_steps, config.eval_every_steps = 12, 12, -1
  config.checkpoint_every_steps = 6
  plain = train.train_and_evaluate(config, str(tmp_path / "plain"))
  config.profile.start_step, config.profile.num_steps = 4, 3
  traced = train.train_and_evaluate(config, str(tmp_path / "traced"))
  assert traced == plain
  assert _traced_calls(tmp_path / "traced", "fn") == [3]  # train.summing's step function
  assert list((tmp_path / "traced" / "tensorboard").glob("plugins/profile/*/*.trace.json.gz"))
  shutil.rmtree(tmp_path / "traced" / "checkpoints" / "12")
  warnings = []
  monkeypatch.setattr(
    "research.profiling.logging.warning", lambda msg, *args: warnings.append(msg % args)
  )
  config.profile.start_step = 5  # resuming after step 6: steps 5-7 came before
  assert train.train_and_evaluate(config, str(tmp_path / "traced")) == plain
  assert _traced_calls(tmp_path / "traced", "fn") == [3]  # no second trace
  assert warnings == [
    "config.profile: steps 5-7 came before this run, which resumed after step 6; nothing traced"
  ]
  # Four steps per call: the calls stop where the trace begins and ends (steps 3-5).
  config.profile.start_step, config.steps_per_dispatch = 3, 4
  train.train_and_evaluate(config, str(tmp_path / "four"))
  assert _traced_calls(tmp_path / "four", "fn_steps") == [1]
  assert _traced_calls(tmp_path / "four", "fn") == [0]
  config.profile.start_step = -1
  with pytest.raises(config_lib.ConfigError, match=r"config.profile.start_step=-1: must be >= 1"):
    train.train_and_evaluate(config, str(tmp_path / "bad"))


def test_a_setting_refused_at_the_first_step_is_a_config_error_and_the_fixed_run_starts(
  tfds_data_dir, tmp_path
):
  """A value the model refuses only in training (fused attention with dropout) stops the
  run at its first step with one ConfigError; the workdir then holds a config but no
  trained step, so the corrected command starts there instead of being refused as a run
  with another config."""
  from research import bench

  config, _ = bench.family_config("lm", smoke=True)
  config.data.data_dir = tfds_data_dir
  config.num_train_steps, config.log_every_steps = 2, 1
  config.model.attention, config.model.dropout = "xla", 0.1
  with pytest.raises(
    config_lib.ConfigError, match=r"^config.model.attention='xla' has no attention dropout"
  ):
    train.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / "config.json").exists() and not train.has_trained(tmp_path)
  config.model.dropout = 0.0
  train.train_and_evaluate(config, str(tmp_path))
  assert train.has_trained(tmp_path)
  config.model.dropout = 0.1  # a run that trained is still guarded
  with pytest.raises(config_lib.ConfigError, match="holds a run with another config"):
    train.train_and_evaluate(config, str(tmp_path))


def test_weight_average_is_evaluated_checkpointed_and_resumed(config, tmp_path):
  import jax

  from research import checkpoint, optim

  config.optimizer.ema_decay = 0.9
  config.num_train_steps, config.checkpoint_every_steps, config.eval_every_steps = 80, 40, -1
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
  assert straight["accuracy"] > 0.6
  step, state = checkpoint.read_tree(tmp_path / "straight" / "checkpoints", None)
  ema = optim.eval_params(state["params"], state["opt_state"])
  pairs = zip(jax.tree.leaves(ema), jax.tree.leaves(state["params"]), strict=True)
  assert step == 80 and not any(np.allclose(a, b) for a, b in pairs)
  train.train_and_evaluate(config, str(tmp_path / "resumed"))
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "80")  # killed after the step-40 save
  assert train.train_and_evaluate(config, str(tmp_path / "resumed")) == straight
  # The average changes no update, only what is evaluated.
  config.optimizer.ema_decay = 0.0
  plain = train.train_and_evaluate(config, str(tmp_path / "plain"))
  assert plain["loss"] != straight["loss"]
  records = lambda run: read_jsonl(tmp_path / run / "metrics.jsonl")  # noqa: E731
  train_losses = lambda run: [r["metrics"]["loss"] for r in records(run) if r["split"] == "train"]  # noqa: E731
  assert train_losses("plain") == train_losses("straight")


def test_bfloat16_compute_trains_with_float32_state(config, tmp_path):
  config.dtype = "bfloat16"
  config.num_train_steps = 60
  config.eval_every_steps = -1
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final["accuracy"] > 0.6
  losses = [
    r["metrics"]["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"
  ]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  step, params = _final_params(tmp_path)
  assert step == 60
  assert all(p.dtype == np.float32 for p in __import__("jax").tree.leaves(params))


def test_sigterm_saves_at_the_next_step_and_the_run_resumes_there(config, tmp_path):
  import subprocess
  import sys

  from helpers.processes import sigterm_once_training

  base = [
    sys.executable, "-m", "research.train", "--config=experiments/mnist_mlp.py",
    f"--workdir={tmp_path}", f"--config.data.data_dir={config.data.data_dir}",
    f"--config.data.raw_dir={config.data.raw_dir}", "--config.log_every_steps=50",
    "--config.checkpoint_every_steps=1000000", "--config.eval_batch_size=1000",
  ]  # fmt: skip
  env = dict(__import__("os").environ, PYTHONPATH=str(config_lib.REPO_ROOT))
  run = subprocess.Popen(
    [*base, "--config.num_train_steps=1000000"], cwd=config_lib.REPO_ROOT, env=env,
    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  stderr = sigterm_once_training(run, tmp_path, timeout_s=120)
  assert run.returncode == 0, stderr[-3000:]
  assert "preempted (SIGTERM) at step" in stderr
  saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(saved) == 1 and saved[0] >= 50
  resumed = subprocess.run(
    [*base, f"--config.num_train_steps={saved[0] + 10}", "--allow_config_change"],
    cwd=config_lib.REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from checkpoint at step {saved[0]}" in resumed.stderr


def test_several_steps_per_dispatch_train_the_same_run(config, tmp_path):
  """steps_per_dispatch=8: calls stop at every log (50), eval (100) and save (60), so the
  same steps are logged, evaluated and saved, with the same parameters as one step per
  call; host-fed data is refused in one line. Each step draws its own crops and flips
  (data.pp_train, on the device) inside a call as between calls."""
  config.num_train_steps = 130
  config.data.pp_train = "pad(2)|random_crop(28)|flip_lr"
  train.train_and_evaluate(config, str(tmp_path / "one"))
  config.steps_per_dispatch = 8
  train.train_and_evaluate(config, str(tmp_path / "eight"))
  records = {}
  for name in ("one", "eight"):
    rows = read_jsonl(tmp_path / name / "metrics.jsonl")
    records[name] = [(r["step"], r["split"], r["metrics"]) for r in rows]
  assert [r[:2] for r in records["eight"]] == [r[:2] for r in records["one"]]
  assert [r[0] for r in records["eight"]] == [50, 100, 100, 130, 130]
  for (_, _, got), (_, _, want) in zip(records["eight"], records["one"], strict=True):
    for key in ("loss", "accuracy"):
      assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6)
  for name in ("one", "eight"):
    saved = sorted(int(p.name) for p in (tmp_path / name / "checkpoints").iterdir())
    assert saved == [60, 120, 130]
  (_, eight), (_, one) = _final_params(tmp_path / "eight"), _final_params(tmp_path / "one")
  leaves = __import__("jax").tree.leaves
  for got, want in zip(leaves(eight), leaves(one), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  config.data.device_resident_mb = 0  # batches from the host: one step per call only
  with pytest.raises(
    config_lib.ConfigError, match="config.steps_per_dispatch=8 needs the training"
  ):
    train.train_and_evaluate(config, str(tmp_path / "host"))
  assert not (tmp_path / "host").exists()  # refused before the workdir is touched


def test_preemption_is_asked_after_every_call_and_can_stop_at_a_save_step(
  config, tmp_path, monkeypatch
):
  """Several processes' preemption sync point is the call id after the highest any of
  them reported, so the loop asks after every call (1, 2, ...), a save step's too."""
  from research.preemption import PreemptionWatcher

  asked = []
  monkeypatch.setattr(
    PreemptionWatcher, "should_stop", lambda self, call: asked.append(call) or call == 9
  )
  config.steps_per_dispatch = 8  # calls end at steps 8, 16, ..., 48, 50 (log), 56, 60 (save)
  assert train.train_and_evaluate(config, str(tmp_path)) == {"preempted_at_step": 60}
  assert asked == list(range(1, 10))
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [60]


def test_nan_halts_naming_the_step_and_keeps_only_good_checkpoints(config, tmp_path):
  config.optimizer = config_lib.entry("optimizer", "sgd", learning_rate=1e30)
  config.model.dropout = 0.0
  config.checkpoint_every_steps = 1
  config.log_every_steps = 1
  with pytest.raises(train.TrainingHalted) as halted:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(halted.value)
  bad_step = int(message.split("step ")[1].split(":")[0])
  assert "is nan" in message or "is inf" in message
  assert f"last good checkpoint: step {bad_step - 1}" in message
  _, params = _final_params(tmp_path)
  assert all(np.isfinite(p).all() for p in __import__("jax").tree.leaves(params))


def test_summing_adds_each_metric_on_the_device_and_keeps_the_first_nonfinite_step():
  import jax
  import jax.numpy as jnp
  from flax import struct

  from research.step import TRAIN_METRICS

  @struct.dataclass
  class State:
    step: jax.Array

  def step_fn(state, loss):
    metrics = {name: jnp.float32(i) for i, name in enumerate(TRAIN_METRICS)}
    nonfinite = (~jnp.isfinite(loss)).astype(jnp.float32)
    metrics.update(loss=loss, grad_norm=2 * loss, nonfinite=nonfinite)
    return state.replace(step=state.step + 1), metrics

  summed = jax.jit(train.summing(step_fn), donate_argnums=(0, 1))

  def run(losses, start=0):
    state, sums = State(jnp.int32(start)), jax.device_put(train.zero_sums())
    for loss in losses:
      state, sums = summed(state, sums, jnp.float32(loss))
    return jax.device_get(sums)

  finite = run([1.5, 2.5, 4.0], start=7)
  assert int(finite["steps"]) == 3 and float(finite["sum"]["loss"]) == 8.0
  assert float(finite["sum"]["grad_norm"]) == 16.0 and float(finite["sum"]["nonfinite"]) == 0
  assert float(finite["sum"]["learning_rate"]) == 3 * TRAIN_METRICS.index("learning_rate")
  assert int(finite["first_nonfinite"]["step"]) == 0
  train.halt_if_nonfinite(finite)  # nothing to halt on
  bad = run([1.0, 2.0, float("inf"), 4.0, float("nan")], start=7)
  assert int(bad["steps"]) == 5 and int(bad["sum"]["nonfinite"]) == 2
  assert int(bad["first_nonfinite"]["step"]) == 10  # state.step 9 -> step 10, 1-based
  assert np.isinf(bad["first_nonfinite"]["loss"]) and np.isinf(bad["first_nonfinite"]["grad_norm"])
  with pytest.raises(train.TrainingHalted, match=r"step 10: loss is inf"):
    train.halt_if_nonfinite(bad)


def test_skip_policy_drops_the_nonfinite_update_and_counts_it():
  import jax
  import jax.numpy as jnp
  import optax

  from research import registry
  from research import step as step_lib

  model = registry.models.get("softmax_regression")(num_classes=3)
  tx = optax.sgd(0.1)
  base_loss = registry.losses.get("softmax_xent")()
  # A loss that is NaN whenever a label is 0: a deterministic bad batch.
  loss_fn = lambda logits, labels: jnp.where(labels == 0, jnp.nan, base_loss(logits, labels))
  state = step_lib.init_state(model, tx, jax.random.key(0), np.zeros((1, 2, 2, 1), np.uint8))
  train_step = jax.jit(
    step_lib.make_train_step(
      model, tx, loss_fn, lambda s: 0.1, jax.random.key(1), skip_nonfinite=True
    )
  )
  image = jnp.full((4, 2, 2, 1), 200, jnp.uint8)
  bad, good = (
    {"inputs": image, "targets": jnp.zeros(4, jnp.int32)},
    {"inputs": image, "targets": jnp.ones(4, jnp.int32)},
  )
  after_bad, metrics = train_step(state, bad)
  assert float(metrics["nonfinite"]) == 1.0 and int(after_bad.step) == 1
  for a, b in zip(jax.tree.leaves(after_bad.params), jax.tree.leaves(state.params), strict=True):
    np.testing.assert_array_equal(a, b)
  after_good, metrics = train_step(after_bad, good)
  assert float(metrics["nonfinite"]) == 0.0
  assert not np.array_equal(after_good.params["head"]["kernel"], state.params["head"]["kernel"])


def test_damaged_checkpoint_is_moved_aside_and_the_run_falls_back(config, tmp_path, caplog):
  import logging

  config.num_train_steps = 120
  config.eval_every_steps = -1
  train.train_and_evaluate(config, str(tmp_path / "damaged"))
  # Damage the newest finished checkpoint (its array data), and leave an unfinished save.
  data_files = [p for p in (tmp_path / "damaged/checkpoints/120/state").rglob("*") if p.is_file()]
  for path in data_files:
    if path.parent.name == "d":
      path.write_bytes(b"")
  (tmp_path / "damaged/checkpoints/180.orbax-checkpoint-tmp-1").mkdir()
  config.num_train_steps = 180
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, str(tmp_path / "damaged"), allow_config_change=True)
  warnings = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
  assert len(warnings) == 1 and "checkpoints/120" in warnings[0]
  assert (tmp_path / "damaged/checkpoints.damaged/120/state").is_dir()  # kept, not deleted
  train.train_and_evaluate(config, str(tmp_path / "straight"))
  step_a, params_a = _final_params(tmp_path / "damaged")
  step_b, params_b = _final_params(tmp_path / "straight")
  assert step_a == step_b == 180
  for a, b in zip(
    __import__("jax").tree.leaves(params_a), __import__("jax").tree.leaves(params_b), strict=True
  ):
    np.testing.assert_array_equal(a, b)  # resumed from step 60: still bitwise


def test_full_disk_during_a_save_stops_the_run_and_keeps_earlier_checkpoints(config, tmp_path):
  """The step-120 save fails in Orbax's background thread (EFBIG, as ENOSPC on a full disk)."""
  import subprocess
  import sys

  base = [
    "--config=experiments/mnist_mlp.py", f"--workdir={tmp_path}",
    f"--config.data.data_dir={config.data.data_dir}",
    f"--config.data.raw_dir={config.data.raw_dir}", "--config.model.widths=(32,)",
    "--config.num_train_steps=240", "--config.checkpoint_every_steps=60",
    "--config.log_every_steps=60", "--config.eval_batch_size=1000",
  ]  # fmt: skip
  env = dict(__import__("os").environ, PYTHONPATH=str(config_lib.REPO_ROOT))
  full = subprocess.run(
    [sys.executable, "tests/helpers/full_disk.py", "120", "20000", *base],
    cwd=config_lib.REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert full.returncode == 1, full.stderr[-3000:]
  last = full.stderr.strip().splitlines()[-1]
  assert last.startswith("error: checkpoint save at step 120 failed ("), last
  assert "File too large" in last and "earlier checkpoints are intact (steps [60])" in last
  assert "Traceback" not in full.stderr  # Orbax's thread tracebacks only with --verbose
  names = {p.name for p in (tmp_path / "checkpoints").iterdir()}
  assert names == {"60", "120.orbax-checkpoint-tmp"}, names  # stopped before the step-180 save
  # Disk space back: the same command resumes from step 60 and finishes.
  resumed = subprocess.run(
    [sys.executable, "-m", "research.train", *base],
    cwd=config_lib.REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from checkpoint at step 60" in resumed.stderr
  assert _final_params(tmp_path)[0] == 240


def test_gradient_accumulation_equals_one_big_batch():
  import jax
  import jax.numpy as jnp
  import optax

  from research import registry
  from research import step as step_lib

  model = registry.models.get("mlp")(widths=(16,), num_classes=10)
  tx = optax.adam(1e-2)
  loss_fn = registry.losses.get("softmax_xent")()
  rng = np.random.default_rng(0)
  batch = {
    "inputs": jnp.asarray(rng.integers(0, 255, (32, 4, 4, 1)), jnp.uint8),
    "targets": jnp.asarray(rng.integers(0, 10, 32), jnp.int32),
  }
  results = {}
  for k in (1, 4):
    state = step_lib.init_state(model, tx, jax.random.key(0), np.zeros((1, 4, 4, 1), np.uint8))
    step = jax.jit(
      step_lib.make_train_step(
        model, tx, loss_fn, lambda s: 1e-2, jax.random.key(1), microbatches=k
      )
    )
    for _ in range(3):
      state, metrics = step(state, batch)
    results[k] = (state, metrics)
  (one, m1), (four, m4) = results[1], results[4]
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for name in ("loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose(m1[name], m4[name], rtol=1e-5)


def test_batchnorm_statistics_train_checkpoint_and_resume_bitwise(config, tmp_path):
  from research import checkpoint

  config.model = config_lib.entry("model", "resnet_cifar", depth=8, width=4)
  config.optimizer = config_lib.entry("optimizer", "momentum", learning_rate=0.05)
  config.global_batch_size, config.num_train_steps = 32, 40
  config.checkpoint_every_steps, config.eval_every_steps = 20, -1
  final = train.train_and_evaluate(config, str(tmp_path / "straight"))
  assert final["accuracy"] > 0.2  # learns (10% is chance; 26% measured) in 40 steps of 32
  step, arrays = checkpoint.read_state(tmp_path / "straight" / "checkpoints")
  stats = [name for name in arrays if name.startswith("model_state/batch_stats/")]
  assert step == 40 and len(stats) == 2 * 9  # mean, var: stem, 3 blocks x 2, 2 projections
  assert not np.allclose(arrays["model_state/batch_stats/stem_bn/mean"], 0)  # updated
  # Killed after the step-20 save: the resumed run ends bitwise equal, statistics included.
  shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "40")
  assert train.train_and_evaluate(config, str(tmp_path / "resumed")) == final
  _, resumed = checkpoint.read_state(tmp_path / "resumed" / "checkpoints")
  assert resumed.keys() == arrays.keys()
  for name, value in arrays.items():
    np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def test_vit_learns_mnist(config, tmp_path):
  config.model = config_lib.entry(
    "model", "vit", patch_size=7, num_layers=2, num_heads=2, embed_dim=32, mlp_ratio=2
  )
  config.optimizer = config_lib.entry("optimizer", "adamw", learning_rate=3e-3)
  config.num_train_steps, config.checkpoint_every_steps = 150, 150
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final["accuracy"] > 0.7  # 10% is chance


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_fresh_state_is_the_initialisers_own_values_bit_for_bit(config, model):
  """The state's init is compiled with experiment.init_compiler_options (each
  parameter's initialiser its own kernel: 84 s to 14 s of compile on an H200; on the
  CPU, LLVM at -O1 as well: 3x faster to compile); the values must be those of the
  program compiled without them."""
  import jax

  from research import experiment

  if model == "mlp":  # same-shaped layers, whose initialisers XLA would fuse
    config.model.widths = (32, 32, 32)
  else:  # convolutions, and Adam's moments of every parameter
    config.model = config_lib.entry("model", "cnn", conv_features=(8, 16), dense_features=32)
  exp = experiment.build(config)
  assert experiment.init_compiler_options(exp.mesh)["xla_backend_optimization_level"] == 1
  state = experiment.fresh_state(exp)
  plain = jax.jit(exp.init, out_shardings=exp.state_sharding)()
  leaves, plain_leaves = jax.tree.leaves(state), jax.tree.leaves(plain)
  assert len(leaves) == len(plain_leaves) > 6
  for a, b in zip(leaves, plain_leaves, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
