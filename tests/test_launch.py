"""SLURM and Cloud TPU launchers cannot run here: their --dry_run prints the exact commands.
The GPU benchmark script runs its LM profile at smoke sizes on the CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

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


def test_gpu_benchmark_script_runs_its_parts_on_the_cpu(tmp_path, tfds_data_dir):
  env = {
    **os.environ, "TFDS_DATA_DIR": tfds_data_dir, "PY": sys.executable, "OUT": str(tmp_path),
    "SMOKE": "1", "PARTS": "profile",
    "VARIANTS": "cudnn:4 xla:4 xla:4:no_command_buffer xla:4:xent_one_pass",
  }  # fmt: skip
  script = str(LAUNCH / "gpu_benchmarks.sh")
  result = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  saved = json.loads((tmp_path / "lm_profile.json").read_text())
  cudnn, xla, xla_options, one_pass = saved["variants"]
  assert cudnn["attention"] == "cudnn" and "error" in cudnn  # no cuDNN here: the row says why
  assert xla["step_ms"] > 0 and xla["step_ms_sustained_5s"] > 0 and xla["mfu"] > 0
  assert xla["options"] == "default" and xla["compiler_options"] == {}
  # The same program and state, compiled again with the option set's XLA options.
  assert xla_options["options"] == "no_command_buffer" and xla_options["step_ms"] > 0
  assert xla_options["compiler_options"] == {"xla_gpu_enable_command_buffer": ""}
  assert xla_options["setup_seconds"]["state_init"] == xla["setup_seconds"]["state_init"]
  assert set(xla["setup_seconds"]) == {"build", "state_init", "step_compile"}
  # A code option traces a step of its own (the loss in one pass), with XLA's defaults.
  assert one_pass["options"] == "xent_one_pass" and one_pass["compiler_options"] == {}
  assert (
    one_pass["step_ms"] > 0 and one_pass["setup_seconds"]["build"] != xla["setup_seconds"]["build"]
  )
  assert saved["profile_of"]["attention"] == "xla" and "kernel" in saved["kernels"]
  assert isinstance(saved["kernels"]["source"], list)  # by model code (GPU planes only)
  assert saved["kernels"]["compiler_options"] == {"xla_gpu_enable_command_buffer": ""}
  assert xla["size"] == "gpt2"
  # research.train at GPT-2's padded vocabulary (LM_SIZE=gpt2_124m), smoke-sized layers
  gpt2 = subprocess.run(
    ["bash", script], env={**env, "PARTS": "gpt2", "LM_SIZE": "gpt2_124m", "GPT2_RETRY": "0"},
    capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert gpt2.returncode == 0 and "exit 0" in gpt2.stdout, gpt2.stdout + gpt2.stderr
  assert "size=gpt2_124m" in gpt2.stdout and "step 4/4" in gpt2.stdout
  # GPT2_RUNS: one run per entry, the one-pass cross-entropy and Triton's GEMMs off as
  # options; an entry given twice logs to a second file.
  entry = "2:xent_one_pass:triton_off"
  runs = subprocess.run(
    ["bash", script], env={**env, "PARTS": "gpt2", "GPT2_RUNS": f"{entry} {entry}"},
    capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert runs.returncode == 0, runs.stdout + runs.stderr
  for name in ("gpt2_b2_xent_one_pass_triton_off", "gpt2_b2_xent_one_pass_triton_off_2"):
    assert re.search(
      f"-- {name}\nXLA_FLAGS=.* --xla_gpu_enable_triton_gemm=false\nexit 0", runs.stdout
    )
    assert "step 4/4" in (tmp_path / f"{name}.log").read_text()
  bad = subprocess.run(
    ["bash", script], env={**env, "PARTS": "gpt2", "GPT2_RUNS": "64:fast"},
    capture_output=True, text=True,
  )  # fmt: skip
  assert bad.returncode == 2
  assert "GPT2_RUNS entry '64:fast': valid: BATCH[:xent_one_pass|:xent_two_pass]" in bad.stderr
  bad = subprocess.run(
    ["bash", script], env={**env, "PARTS": "profile bogus"}, capture_output=True, text=True
  )
  assert bad.returncode == 2
  assert "unknown part 'bogus': valid: gpt2 profile cnn bench" in bad.stderr
  bad = subprocess.run(
    [sys.executable, str(LAUNCH / "gpu_lm_profile.py"), str(tmp_path), "--smoke"],
    env={**env, "VARIANTS": "xla:4:fastest"}, capture_output=True, text=True,
  )  # fmt: skip
  assert bad.returncode != 0 and "options 'fastest': valid: default, cublaslt" in bad.stderr


def test_gpu_init_probe_compiles_each_form_of_the_state_init(tmp_path, tfds_data_dir):
  env = {**os.environ, "TFDS_DATA_DIR": tfds_data_dir}
  script = str(LAUNCH / "gpu_init_probe.py")
  rows = []
  for variant in ("const+nomof+o1", "params_only"):
    done = subprocess.run(
      [sys.executable, script, variant, str(tmp_path), "--smoke"],
      env=env, capture_output=True, text=True, timeout=300, cwd=LAUNCH.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert (tmp_path / f"init_{variant}.hlo.txt").read_text().startswith("HloModule")
  assert [r["variant"] for r in rows] == ["const+nomof+o1", "params_only"]
  assert all(r["compile_s"] > 0 and r["fusions"] > 0 for r in rows)
  bad = subprocess.run([sys.executable, script, "const+typo", str(tmp_path)], env=env,
                       capture_output=True, text=True, cwd=LAUNCH.parent)  # fmt: skip
  assert bad.returncode == 1 and "unknown variant 'const+typo'" in bad.stderr
