"""End to end on real MNIST: learning, writers, checkpoints, exact resume, workdir safety."""

from __future__ import annotations

import json
import shutil

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
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final["accuracy"] > 0.85
  records = read_jsonl(tmp_path / "metrics.jsonl")
  train_losses = [r["metrics"]["loss"] for r in records if r["split"] == "train"]
  assert [r["step"] for r in records if r["split"] == "train"] == [50, 100, 150, 200]
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


def test_workdir_with_another_config_is_refused(config, tmp_path):
  config.num_train_steps = 20
  train.train_and_evaluate(config, str(tmp_path))
  before = (tmp_path / "config.json").read_text()
  config.optimizer.learning_rate = 0.5
  with pytest.raises(config_lib.ConfigError, match=r"optimizer.learning_rate: 0.001 -> 0.5"):
    train.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / "config.json").read_text() == before


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
  import signal
  import subprocess
  import sys
  import time

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
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
    time.sleep(0.5)
  run.send_signal(signal.SIGTERM)
  _, stderr = run.communicate(timeout=120)
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
