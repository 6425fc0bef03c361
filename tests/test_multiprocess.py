"""Two processes through jax.distributed (launch/local_multiprocess.sh) equal one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers.processes import sigterm_once_training

from research import config as config_lib
from research.metrics import read_jsonl

LAUNCHER = config_lib.REPO_ROOT / "launch" / "local_multiprocess.sh"


def _flags(workdir, tfds_data_dir, mnist_raw_dir):
  return [
    "--config=experiments/mnist_mlp.py", f"--workdir={workdir}",
    f"--config.data.data_dir={tfds_data_dir}", f"--config.data.raw_dir={mnist_raw_dir}",
    "--config.num_train_steps=200", "--config.log_every_steps=10",
    "--config.checkpoint_every_steps=100", "--config.eval_batch_size=1000",
    "--config.data.pp_train=pad(2)|random_crop(28)|flip_lr",  # in the step, on the device
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
  # ... and four steps per jitted call there (calls of 4, 4, 2 between log lines), each
  # with its four steps' crops and flips; a profile of steps 7-9 splits calls on every
  # process (else they would run different programs) and process 0 traces
  flags = [*_flags(tmp_path / "two", tfds_data_dir, mnist_raw_dir), "--config.steps_per_dispatch=4"]
  flags += ["--config.profile.start_step=7"]
  double = subprocess.run(
    ["bash", str(LAUNCHER), "2", *flags],
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
  assert len(list((tmp_path / "two" / "tensorboard").glob("plugins/profile/*/*.xplane.pb"))) == 1


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


def test_barrier_timeout_names_the_late_process():
  port = str(21000 + os.getpid() % 5000)
  probe = [sys.executable, "tests/helpers/barrier_probe.py", port]
  kwargs = dict(cwd=config_lib.REPO_ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
  processes = [subprocess.Popen([*probe, str(i)], **kwargs) for i in (0, 1)]
  outputs = [p.communicate(timeout=120)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0]
  assert (
    "error: barrier 'never_reached_by_1' timed out after 3s: process(es) [1] did not arrive"
    in (outputs[0])
  )


def test_one_process_checkpoint_resumes_as_two(mnist, tfds_data_dir, mnist_raw_dir, tmp_path):
  del mnist
  straight, moved = tmp_path / "straight", tmp_path / "moved"
  run = lambda command, workdir, steps: subprocess.run(
    [*command, *_flags(workdir, tfds_data_dir, mnist_raw_dir), f"--config.num_train_steps={steps}",
     "--allow_config_change"],
    capture_output=True, text=True, cwd=config_lib.REPO_ROOT, env=_env(), timeout=600,
  )  # fmt: skip
  one_process = [sys.executable, "-m", "research.train"]
  two_processes = ["bash", str(LAUNCHER), "2"]
  assert run(one_process, straight, 200).returncode == 0
  assert run(one_process, moved, 100).returncode == 0
  resumed = run(two_processes, moved, 200)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from checkpoint at step 100" in resumed.stderr
  losses = lambda w: [
    r["metrics"]["loss"] for r in read_jsonl(w / "metrics.jsonl") if r["split"] == "train"
  ]
  assert len(losses(moved)) == 20
  assert losses(moved) == pytest.approx(losses(straight), rel=1e-5)


def test_sigterm_to_the_launcher_stops_both_processes_at_one_checkpoint(
  mnist, tfds_data_dir, mnist_raw_dir, tmp_path
):
  del mnist
  flags = _flags(tmp_path, tfds_data_dir, mnist_raw_dir)
  flags += ["--config.num_train_steps=1000000", "--config.checkpoint_every_steps=1000000"]
  launcher = subprocess.Popen(
    ["bash", str(LAUNCHER), "2", *flags], cwd=config_lib.REPO_ROOT, env=_env(),
    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  stderr = sigterm_once_training(launcher, tmp_path)
  assert launcher.returncode == 0, stderr[-3000:]
  preempted = [line for line in stderr.splitlines() if "preempted (SIGTERM) at step" in line]
  assert len(preempted) == 2  # both processes, at the same step
  assert len({line.split("at step ")[1].split(":")[0] for line in preempted}) == 1
  assert len([p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]) == 1
