"""Transfer-learning studies: one command trains what a table needs and writes it.

    python -m research.transfer_study --study=digits_clothing    # MNIST <-> Fashion-MNIST
    python -m research.transfer_study --study=digits_sklearn     # MNIST -> scikit-learn digits

For each source -> target pair and model: the source trains from scratch once
(seed 0); on the target, with equal step budgets and 3 seeds each, a run from
scratch, a linear probe of the source (backbone frozen), a full fine-tune and
a fine-tune with the backbone's learning rate x0.1; and the few-shot probe of
the source's frozen features (k examples per class, ridge regression, 3
draws). Every run is a subprocess of the command the table lists, in its own
workdir under --root; finished runs are skipped, so the same command resumes
a study. The table (mean +- std over seeds, n) replaces the study's section of
--out, with the commands, config hashes, checkpoint steps, seeds and versions.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags, logging

from research.results import final_metrics

CONFIG = "experiments/transfer.py"
SHOTS = (1, 5, 10, 25)
MODES = {  # column -> config overrides on top of init.checkpoint
  "scratch": None,
  "linear probe": ["--config.init.mode=linear_probe"],
  "fine-tune": ["--config.init.mode=finetune"],
  "fine-tune, backbone lr x0.1": [
    "--config.init.mode=finetune", "--config.init.backbone_lr_scale=0.1"
  ],
}  # fmt: skip
STUDIES = {  # name -> (pairs, modes, default target steps)
  "digits_clothing": ([("fashion_mnist", "mnist"), ("mnist", "fashion_mnist")], list(MODES), 150),
  "digits_sklearn": ([("mnist", "digits")], ["scratch", "fine-tune"], 50),
}


@dataclasses.dataclass
class Run:
  workdir: Path
  command: list[str]

  @property
  def done(self) -> bool:
    return bool(final_metrics(self.workdir) or fewshot_metrics(self.workdir))

  def run(self) -> None:
    if self.done:
      logging.info("done already: %s", self.workdir)
      return
    self.workdir.parent.mkdir(parents=True, exist_ok=True)
    log = self.workdir.parent / f"{self.workdir.name}.log"
    logging.info("running (log %s): %s", log, " ".join(self.command))
    t0 = time.perf_counter()
    with open(log, "a") as f:
      result = subprocess.run(self.command, stdout=f, stderr=subprocess.STDOUT, check=False)
    if result.returncode:
      raise RuntimeError(f"{' '.join(self.command)} failed (exit {result.returncode}); see {log}")
    logging.info("finished in %.0fs: %s", time.perf_counter() - t0, self.workdir)


def train_command(data: str, model: str, steps: int, seed: int, workdir: Path, extra=()):
  spec = f"{CONFIG}:data={data},model={model},steps={steps},seed={seed}"
  return [sys.executable, "-m", "research.train", f"--config={spec}", *extra,
          f"--workdir={workdir}"]  # fmt: skip


def fewshot_run(source: Path, target: str, model: str, steps: int) -> Run:
  out = source.parent / f"fewshot_{source.name}_on_{target}"
  spec = f"{CONFIG}:data={target},model={model},steps={steps}"
  command = [sys.executable, "-m", "research.evaluate", f"--checkpoint={source}",
             f"--config={spec}", "--evaluators=fewshot", f"--output_dir={out}"]  # fmt: skip
  return Run(out, command)


def fewshot_metrics(out: Path) -> dict | None:
  files = sorted(out.glob("metrics_*.json")) if out.is_dir() else []
  return json.loads(files[-1].read_text()) if files else None


def mean_std(values: list[float]) -> str:
  if not values:
    return "-"
  mean = 100 * statistics.mean(values)
  std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{mean:.2f} ± {std:.2f} (n={len(values)})"


def run_study(name: str, root: Path, models, seeds: int, steps: int, source_steps: int):
  """Runs what is missing; returns the markdown section."""
  from research.versions import versions

  pairs, modes, default_steps = STUDIES[name]
  steps = steps or default_steps
  rows, commands, details = [], [], []
  for model in models:
    for source_data, target in pairs:
      source = root / f"source_{source_data}_{model}"
      Run(source, train_command(source_data, model, source_steps, 0, source)).run()
      pair = f"{source_data} -> {target}"
      cells = {}
      for mode in modes:
        runs = [target_run(root, source, source_data, target, model, mode, steps, seed)
                for seed in range(seeds)]  # fmt: skip
        for run in runs:
          run.run()
        cells[mode] = mean_std([final_metrics(run.workdir)["accuracy"] for run in runs])
        command = " ".join(shorten(runs[0].command))
        commands.append(f"| {model} | {pair} | {mode} | `{command}` (seeds 0-{seeds - 1}) |")
        details.append(detail_row(runs[0].workdir))
      fewshot = fewshot_run(source, target, model, steps)
      fewshot.run()
      commands.append(f"| {model} | {pair} | few-shot | `{' '.join(shorten(fewshot.command))}` |")
      record = fewshot_metrics(fewshot.workdir)
      draws = record["config"]["evaluators"]["fewshot_seeds"]
      for k in SHOTS:
        mean = record["metrics"][f"fewshot_{k}shot"]
        std = record["metrics"][f"fewshot_{k}shot_std"]
        cells[f"{k}-shot"] = f"{100 * mean:.2f} ± {100 * std:.2f} (n={draws})"
      source_accuracy = 100 * final_metrics(source)["accuracy"]
      rows.append((model, f"{source_data} ({source_accuracy:.2f}%) -> {target}", cells))
  columns = list(modes) + [f"{k}-shot" for k in SHOTS]
  lines = [
    f"## {name}", "",
    f"Test accuracy (%) on the target, mean ± std over seeds; every target run trains "
    f"{steps} steps of 128 examples; sources train {source_steps} steps from scratch "
    "(their own test accuracy in brackets). Few-shot: the source's frozen features, "
    "ridge regression on k train examples per class, mean ± std over 3 draws.", "",
    "| model | source -> target | " + " | ".join(columns) + " |",
    "|---|---|" + "---|" * len(columns),
  ]  # fmt: skip
  for model, pair, cells in rows:
    lines.append(f"| {model} | {pair} | " + " | ".join(cells.get(c, "-") for c in columns) + " |")
  lines += ["", "Commands (from the repository root; sources: `python -m research.train "
            f"--config={CONFIG}:data=SOURCE,model=MODEL,steps={source_steps},seed=0 "
            f"--workdir={root}/source_SOURCE_MODEL`):", "",
            "| model | pair | column | command |", "|---|---|---|---|", *commands, "",
            "Config hashes (seed 0 of each cell) and the source checkpoint step each loaded:", "",
            "| run | config hash | source step |", "|---|---|---|", *details, "",
            f"Library versions: {json.dumps(versions())}", ""]  # fmt: skip
  return "\n".join(lines)


def target_run(root, source, source_data, target, model, mode, steps, seed) -> Run:
  workdir = root / f"{target}_from_{source_data}_{model}_{mode_slug(mode)}_seed{seed}"
  extra = [] if MODES[mode] is None else [f"--config.init.checkpoint={source}", *MODES[mode]]
  return Run(workdir, train_command(target, model, steps, seed, workdir, extra))


def detail_row(workdir: Path) -> str:
  from research import config as config_lib

  saved = json.loads((workdir / "config.json").read_text())
  digest = config_lib.config_hash(config_lib.from_saved(saved["config"]))
  return f"| {workdir.name} | {digest} | {saved['derived'].get('init', {}).get('step', '-')} |"


def mode_slug(mode: str) -> str:
  return {"scratch": "scratch", "linear probe": "probe", "fine-tune": "finetune",
          "fine-tune, backbone lr x0.1": "finetune_lr0.1"}[mode]  # fmt: skip


def shorten(command: list[str]) -> list[str]:
  return ["python", *command[1:]]


def write_section(out: Path, name: str, section: str) -> None:
  """Replaces the study's section of `out` (between its markers), keeping the others."""
  begin, end = f"<!-- study:{name} -->", f"<!-- /study:{name} -->"
  text = out.read_text() if out.exists() else "# Transfer learning\n\n"
  block = f"{begin}\n{section}\n{end}"
  if begin in text:
    text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
  else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)


def define_flags():
  """Defined on the command line only, so that the entry points import together."""
  flags.DEFINE_enum("study", None, ["digits_clothing", "digits_sklearn"], "Which study.")
  flags.DEFINE_string("root", "runs/transfer", "Where the runs' workdirs go.")
  flags.DEFINE_string("out", "results/transfer.md", "The results file.")
  flags.DEFINE_list("models", ["cnn", "resnet20"], "Models: cnn, resnet20.")
  flags.DEFINE_integer("seeds", 3, "Seeds per target cell.")
  flags.DEFINE_integer("steps", 0, "Target step budget; 0: the study's default.")
  flags.DEFINE_integer("source_steps", 938, "Source training steps (2 epochs).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if flags.FLAGS.study is None:
    raise app.UsageError("--study is required")
  args = flags.FLAGS
  section = run_study(
    args.study, Path(args.root), args.models, args.seeds, args.steps, args.source_steps
  )
  write_section(Path(args.out), args.study, section)
  print(section)


if __name__ == "__main__":
  define_flags()
  app.run(main)
