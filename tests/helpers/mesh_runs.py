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

EXPERIMENTS = {
  "mlp": "mnist_mlp.py",
  "cnn": "mnist_cnn.py",
  "lm": "shakespeare_char.py",
  "resnet": "fashion_mnist_resnet20.py",
  "vit": "fashion_mnist_vit.py",
  "seq2seq": "multi30k_de_en.py",  # DATA_DIR and RAW_DIR: Multi30K's
}


def run(
  model: str, mesh: str, data_dir: str, raw_dir: str, workdir: Path, steps: int, schedule: str
) -> list[float]:
  config = config_lib.load_file(f"{config_lib.REPO_ROOT}/experiments/{EXPERIMENTS[model]}")
  config.data.data_dir = data_dir
  if model == "lm":  # a small Transformer: FSDP shards embed, TP shards heads and mlp
    config.model.update(num_layers=2, num_heads=4, embed_dim=64)
    config.optimizer.learning_rate = 1e-3  # the figures in the README were measured at 1e-3
    config.global_batch_size, config.eval_batch_size = 16, 64
  elif model == "seq2seq":  # encoder, decoder, cross-attention; bucketed batches
    config.model.update(num_layers=1, num_heads=4, embed_dim=32)
    # seq_len 24: two length buckets (16, 24), so two programs to compile per mesh, not five
    config.data.update(raw_dir=raw_dir, vocab_size=1000, eval_split="test[:64]", seq_len=24)
    config.global_batch_size, config.eval_batch_size = 16, 64
    config.decode.update(beam_size=1, max_new_tokens=8)
  else:
    config.data.name = "mnist"
    config.data.raw_dir, config.data.eval_split = raw_dir, "test[:1000]"
    config.global_batch_size, config.eval_batch_size = 32, 200
  if model == "resnet":  # BatchNorm over the global batch, augmentation, momentum SGD
    config.model.update(depth=8, width=8)
    config.optimizer.learning_rate = 0.02
  if model == "vit":
    config.model.update(num_layers=2, num_heads=4, embed_dim=32, patch_size=7)
  config.num_train_steps = steps
  config.log_every_steps = 1
  # "warmup_cosine": the experiments' schedule shape, fitted to the run. At a
  # constant 2e-3 from step 0 the CNN's trajectory is chaotic: even 2-way data
  # parallel drifts from one device by 3e-5 at step 50 (float sums in another
  # order, amplified by Adam), though steps 1-40 agree to 2e-7. "constant" is
  # for runs resumed with a longer num_train_steps (the schedule must not move).
  kwargs = {"warmup_steps": 10} if schedule == "warmup_cosine" else {}
  config.schedule = config_lib.entry("schedule", schedule, **kwargs)
  config.mesh.data, config.mesh.fsdp, config.mesh.model = (int(x) for x in mesh.split(","))
  train.train_and_evaluate(config, str(workdir), allow_config_change=True)  # runs may continue
  return [
    r["metrics"]["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == "train"
  ]


def main(out, data_dir, raw_dir, workroot, *specs):
  results = {}
  for spec in specs:  # model:mesh[:steps:workdir name:schedule]
    model, mesh, *rest = spec.split(":")
    steps, name, schedule = rest or (50, f"{model}_{mesh.replace(',', '_')}", "warmup_cosine")
    results[spec] = run(model, mesh, data_dir, raw_dir, Path(workroot) / name, int(steps), schedule)
  Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
  main(*sys.argv[1:])
