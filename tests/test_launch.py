"""SLURM and Cloud TPU launchers cannot run here: their --dry_run prints the exact commands."""

from __future__ import annotations

import subprocess

from research import config as config_lib

LAUNCH = config_lib.REPO_ROOT / "launch"
TRAIN = ["--config=experiments/mnist_cnn.py", "--workdir=runs/cnn", "--config.mesh.data=-1"]


def _run(script, *args):
  return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True)


def test_slurm_dry_run_prints_the_batch_script():
  result = _run("slurm.sh", "--dry_run", "--nodes=2", "--gpus_per_node=4", "--", *TRAIN)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  for line in (
    "#SBATCH --nodes=2",
    "#SBATCH --ntasks-per-node=4",
    "#SBATCH --gpus-per-node=4",
    "#SBATCH --output=runs/cnn/slurm-%j.out",
    "# then: sbatch runs/cnn/slurm.sbatch",
  ):
    assert line in out.splitlines(), line
  assert (
    "srun --kill-on-bad-exit=1 python -m research.train --config=experiments/mnist_cnn.py "
    "--workdir=runs/cnn --config.mesh.data=-1" in out
  )


def test_tpu_dry_run_prints_create_copy_install_run_delete():
  result = _run(
    "tpu_vm.sh", "--dry_run", "--name=r1", "--zone=us-central2-b", "--accelerator_type=v4-16",
    "--project=p", "--", *TRAIN,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].startswith("git -C ") and "archive" in lines[0]
  assert lines[1] == (
    "gcloud compute tpus tpu-vm create r1 --zone=us-central2-b --project=p "
    "--accelerator-type=v4-16 --version=tpu-ubuntu2204-base"
  )
  assert "scp" in lines[2] and "--worker=all" in lines[2]
  assert 'pip install -e ".[tpu]"' in lines[3] and "--worker=all" in lines[3]
  assert (
    "--worker=all" in lines[4] and "RESEARCH_DISTRIBUTED=auto python -m research.train" in lines[4]
  )
  assert "--workdir=runs/cnn" in lines[4]
  assert lines[5] == "gcloud compute tpus tpu-vm delete r1 --zone=us-central2-b --project=p --quiet"


def test_launchers_reject_bad_options():
  assert _run("slurm.sh", "--dry_run", "--", "--config=x.py").returncode == 2  # no --workdir
  bad = _run("tpu_vm.sh", "--dry_run", "--zone=z", "--accelerator_type=v4-8", "--", *TRAIN)
  assert bad.returncode == 2 and "--name= is required" in bad.stderr
  assert _run("slurm.sh", "--nodes_typo=2").returncode == 2
