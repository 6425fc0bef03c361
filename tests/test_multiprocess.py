"""Two processes through jax.distributed (launch/local_multiprocess.sh) equal one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from research import config as config_lib
from research.metrics import read_jsonl

LAUNCHER = config_lib.REPO_ROOT / "launch" / "local_multiprocess.sh"


def _flags(workdir, tfds_data_dir, mnist_raw_dir):
  return [
    "--config=experiments/mnist_mlp.py", f"--workdir={workdir}",
    f"--config.data.data_dir={tfds_data_dir}", f"--config.data.raw_dir={mnist_raw_dir}",
    "--config.num_train_steps=200", "--config.log_every_steps=10",
    "--config.checkpoint_every_steps=100", "--config.eval_batch_size=1000",
  ]  # fmt: skip


def _env():
  return dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(config_lib.REPO_ROOT))


def test_two_processes_match_one(mnist, tfds_data_dir, mnist_raw_dir, tmp_path):
  del mnist  # prepared by the session fixture
  train = [sys.executable, "-m", "research.train"]
  single = subprocess.run(
    [*train, *_flags(tmp_path / "one", tfds_data_dir, mnist_raw_dir)],
    capture_output=True, text=True, cwd=config_lib.REPO_ROOT, env=_env(), timeout=600,
  )  # fmt: skip
  assert single.returncode == 0, single.stderr[-3000:]
  double = subprocess.run(
    ["bash", str(LAUNCHER), "2", *_flags(tmp_path / "two", tfds_data_dir, mnist_raw_dir)],
    capture_output=True, text=True, cwd=config_lib.REPO_ROOT, env=_env(), timeout=600,
  )  # fmt: skip
  assert double.returncode == 0, double.stderr[-3000:]
  assert "[process 1]" in double.stderr and "[process 0]" in double.stderr
  one = read_jsonl(tmp_path / "one" / "metrics.jsonl")
  two = read_jsonl(tmp_path / "two" / "metrics.jsonl")  # written by process 0 only
  losses = lambda records: [r["metrics"]["loss"] for r in records if r["split"] == "train"]
  assert len(losses(one)) == 20
  assert losses(two) == pytest.approx(losses(one), rel=1e-5)
  accuracy = lambda records: [r["metrics"]["accuracy"] for r in records if r["split"] == "test"]
  assert accuracy(two) == pytest.approx(accuracy(one), abs=2e-4)
  steps = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())
  assert steps == ["100", "200"]  # both processes took part in each save


def test_launcher_rejects_a_bad_process_count(tmp_path):
  result = subprocess.run(["bash", str(LAUNCHER), "zero"], capture_output=True, text=True)
  assert result.returncode == 2 and "usage:" in result.stderr


def test_bad_manual_launch_is_one_line(tmp_path):
  env = dict(_env(), RESEARCH_COORDINATOR="localhost:1", RESEARCH_NUM_PROCESSES="2")
  env["RESEARCH_PROCESS_ID"] = "5"
  result = subprocess.run(
    [sys.executable, "-m", "research.train", "--config=experiments/mnist_softmax.py",
     f"--workdir={tmp_path / 'w'}"],
    capture_output=True, text=True, cwd=config_lib.REPO_ROOT, env=env, timeout=120,
  )  # fmt: skip
  assert result.returncode == 2
  assert "0 <= process_id < num_processes (got 2, 5)" in result.stderr.strip().splitlines()[-1]
