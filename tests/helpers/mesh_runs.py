"""Runs short trainings on several meshes in one process; prints per-step losses as JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/helpers/mesh_runs.py \
        OUT.json DATA_DIR RAW_DIR WORKROOT model:data,fsdp,model ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from research import config as config_lib
from research import train
from research.metrics import read_jsonl

EXPERIMENTS = {"mlp": "mnist_mlp.py", "cnn": "mnist_cnn.py"}


def run(
  model: str, mesh: str, data_dir: str, raw_dir: str, workdir: Path, steps: int = 50
) -> list[float]:
  config = config_lib.load_file(f"{config_lib.REPO_ROOT}/experiments/{EXPERIMENTS[model]}")
  config.data.data_dir, config.data.raw_dir = data_dir, raw_dir
  config.data.eval_split = "test[:1000]"
  config.global_batch_size = 32
  config.eval_batch_size = 200
  config.num_train_steps = steps
  config.log_every_steps = 1
  config.schedule = config_lib.entry("schedule", "constant")
  config.mesh.data, config.mesh.fsdp, config.mesh.model = (int(x) for x in mesh.split(","))
  train.train_and_evaluate(config, str(workdir), allow_config_change=True)  # runs may continue
  return [
    r["metrics"]["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == "train"
  ]


def main(out, data_dir, raw_dir, workroot, *specs):
  results = {}
  for spec in specs:  # model:mesh[:steps[:workdir name]]
    model, mesh, *rest = spec.split(":")
    steps = int(rest[0]) if rest else 50
    name = rest[1] if len(rest) > 1 else f"{model}_{mesh.replace(',', '_')}"
    results[spec] = run(model, mesh, data_dir, raw_dir, Path(workroot) / name, steps)
  Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
  main(*sys.argv[1:])
