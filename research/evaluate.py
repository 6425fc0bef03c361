"""Evaluate a saved checkpoint with any evaluators.

    python -m research.evaluate --checkpoint=runs/mnist_cnn
    python -m research.evaluate --checkpoint=runs/mnist_cnn/checkpoints/1000 \
        --evaluators=loss,classification,fewshot
    python -m research.evaluate --checkpoint=runs/fmnist_cnn \
        --config=experiments/mnist_cnn.py --evaluators=fewshot   # another dataset

`--checkpoint` is a run's workdir (its latest checkpoint), its checkpoints/
directory, or checkpoints/STEP. The config is the run's own config.json unless
`--config` names a file (with `--config.key=value` overrides as in training).
The same evaluators, batch size and mesh as training give the same numbers as
training reported. Metrics are printed and written with the command, the
checkpoint, the config and library versions to
`--output_dir` (default `<workdir>/evaluate`) as `metrics_<split>_<step>.json`,
beside the evaluators' files (confusion matrices, translations); nothing in the
run's own files is touched.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from research import cli, registry, runtime
from research import config as config_lib


def define_flags():
  """Defined on the command line only, so that research.train and this module import together."""
  config_flags.DEFINE_config_file("config", None, "Config file; default: the run's own.")
  flags.DEFINE_string("checkpoint", None, "WORKDIR, WORKDIR/checkpoints[/STEP].")
  flags.DEFINE_string("evaluators", "", "Overrides config.evaluators.names.")
  flags.DEFINE_string("output_dir", "", "Default: <workdir>/evaluate.")


class EvaluateError(ValueError):
  """Bad input: the message is one line."""


def load_config(checkpoint_dir: Path, config=None):
  """The given config, or the run's config.json beside its checkpoints/ directory."""
  if config is not None:
    return config
  saved = checkpoint_dir.parent / "config.json"
  if not saved.is_file():
    raise EvaluateError(
      f"--checkpoint={checkpoint_dir}: no config.json in {checkpoint_dir.parent}; pass --config"
    )
  return config_lib.from_saved(json.loads(saved.read_text())["config"])


def restore_variables(exp, checkpoint_dir: Path, step: int | None):
  """(step, evaluation variables of the checkpoint on the experiment's mesh). The
  arrays must match the config's model by name and shape (one-line error otherwise)."""
  import jax
  import ml_collections

  from research import transfer
  from research.sharding import path_name

  try:
    step, source = transfer.evaluation_arrays(checkpoint_dir, step)
  except FileNotFoundError as e:
    raise EvaluateError(str(e)) from None
  shardings = {"params": exp.state_sharding.params, "model_state": exp.state_sharding.model_state}
  shapes = {"params": exp.state_shape.params, "model_state": exp.state_shape.model_state}
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  names = [path_name(p) for p, _ in flat]
  everything = ml_collections.ConfigDict(dict(rules=(".*",), reinit=()))
  shapes = {n: leaf.shape for n, (_, leaf) in zip(names, flat, strict=True)}
  origin = f"--checkpoint={checkpoint_dir} (step {step}) does not fit config.model"
  transfer.plan(shapes, source, everything, origin)
  leaves = [
    transfer.to_global(source[name].astype(leaf.dtype), sharding)
    for name, (_, leaf), sharding in zip(names, flat, jax.tree.leaves(shardings), strict=True)
  ]
  variables = jax.tree_util.tree_unflatten(treedef, leaves)
  return step, {"params": variables["params"], **variables["model_state"]}


def evaluate_checkpoint(checkpoint: str, config=None, output_dir: str = "", evaluators=""):
  """(step, metrics) of a checkpoint; writes the record to the output directory."""
  from research import evaluators as evaluators_lib
  from research import experiment, transfer
  from research.versions import versions

  checkpoint_dir, step = transfer.resolve_checkpoint(checkpoint)
  if not checkpoint_dir.is_dir():
    raise EvaluateError(f"--checkpoint={checkpoint}: no such directory")
  config = load_config(checkpoint_dir, config)
  if evaluators:
    config.evaluators.names = evaluators
  config.init.checkpoint = ""  # the checkpoint is the model; no transfer initialisation
  exp = experiment.build(config)
  step, variables = restore_variables(exp, checkpoint_dir, step)
  out = Path(output_dir) if output_dir else checkpoint_dir.parent / "evaluate"
  if exp.process_index == 0:
    out.mkdir(parents=True, exist_ok=True)
  metrics = evaluators_lib.Evaluation(exp, out)(variables, step, final=True)
  if exp.process_index == 0:
    split = config.data.eval_split
    record = {
      "command": " ".join(sys.argv),
      "checkpoint": str(checkpoint_dir.absolute()),
      "step": step,
      "split": split,
      "mesh": dict(exp.mesh.shape),
      "metrics": metrics,
      "config_hash": config_lib.config_hash(config),
      "config": config.to_dict(),
      "versions": versions(),
    }
    safe_split = re.sub(r"[^\w.-]+", "_", split).strip("_")
    path = out / f"metrics_{safe_split}_{step}.json"
    path.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    logging.info("wrote %s", path)
  return step, metrics


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  args = flags.FLAGS
  if not args.checkpoint:
    return cli.usage_error("--checkpoint is required")
  runtime.tune_malloc()  # before JAX starts its threads
  runtime.apply_xla_defaults("")  # every model's CPU flags (the model is in the checkpoint)
  from research.data.sources import DataError

  try:
    step, metrics = evaluate_checkpoint(
      args.checkpoint, args.config, args.output_dir, args.evaluators
    )
  except (EvaluateError, config_lib.ConfigError, registry.UnknownNameError, DataError) as e:
    return cli.usage_error(str(e))
  print(f"step {step}: " + ", ".join(f"{k}={v:.6f}" for k, v in metrics.items()))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
