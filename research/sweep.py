"""Sweeps: a config file's `get_sweep()` expanded into runs with stable workdirs.

    python -m research.sweep --config=experiments/shakespeare_scaling.py --root=runs/sweeps
    python -m research.sweep --config=... --parallel=2          # two runs at a time
    python -m research.sweep --config=... --list                # names and status only
    python -m research.sweep --config=... --launcher=slurm --launcher_flags=--nodes=2,--dry_run

`get_sweep(arg=None)` returns a list of dicts, one per run, of overrides:
dotted config keys (`"optimizer.learning_rate": 1e-3`) and, under the key
`"arg"`, the config file's variant argument (`"size=cpu30"`). `grid`, `zip_`
and `seeds` below build such lists. Each run's workdir is
`ROOT/<config name>/<key=value,...>` (short key names, or the full dotted path
where two would collide): the same sweep always gives the same names.
Finished runs (their final evaluation is in metrics.jsonl) are skipped;
unfinished ones are run with the same command, which resumes them from their
last checkpoint. With `--launcher=slurm|tpu` the same training flags go to
launch/slurm.sh or launch/tpu_vm.sh, one submission per run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags, logging

from research import cli
from research import config as config_lib

LAUNCHERS = {"slurm": "launch/slurm.sh", "tpu": "launch/tpu_vm.sh"}


def grid(**axes) -> list[dict]:
  """Every combination: grid(lr=[1, 2], seed=[0, 1]) -> 4 runs (keys: dotted config paths)."""
  keys = list(axes)
  return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes.values())]


def zip_(**axes) -> list[dict]:
  """Element by element: zip_(width=[64, 128], lr=[2e-3, 1e-3]) -> 2 runs."""
  keys = list(axes)
  return [dict(zip(keys, values, strict=True)) for values in zip(*axes.values(), strict=True)]


def product(*sweeps: list[dict]) -> list[dict]:
  """Every combination of the runs of several sweeps: product(zip_(...), seeds(3))."""
  return [
    dict(itertools.chain(*(d.items() for d in combo))) for combo in itertools.product(*sweeps)
  ]


def seeds(n: int) -> list[dict]:
  return [{"seed": s} for s in range(n)]


def _format(value) -> str:
  if isinstance(value, tuple | list):
    return "(" + ",".join(_format(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def run_name(overrides: dict) -> str:
  """'learning_rate=0.001,seed=0': short keys unless two collide, the config file's variant
  argument as it is; hashed if very long."""
  short = {k: k.rsplit(".", 1)[-1] for k in overrides}
  counts = {}
  for name in short.values():
    counts[name] = counts.get(name, 0) + 1
  value = lambda v: "-".join(map(str, v)) if isinstance(v, tuple | list) else str(v)  # noqa: E731
  parts = [value(v) if k == "arg" else f"{short[k] if counts[short[k]] == 1 else k}={value(v)}"
           for k, v in overrides.items()]  # fmt: skip
  name = re.sub(r"[^\w.=,+-]+", "_", ",".join(parts)).strip("_") or "default"
  if len(name) > 120:
    name = name[:100] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
  return name


@dataclasses.dataclass
class SweepRun:
  name: str
  workdir: Path
  train_flags: list[str]  # research.train's flags, --workdir last

  def command(self) -> list[str]:
    return [sys.executable, "-m", "research.train", *self.train_flags]

  def status(self) -> str:
    from research import results

    if results.is_finished(self.workdir):
      return "finished"
    return "unfinished" if (self.workdir / "checkpoints").is_dir() else "new"


def expand(config_spec: str, root: str | Path) -> list[SweepRun]:
  """The runs of the config file's get_sweep(), in its order."""
  path, _, arg = config_spec.partition(":")
  module = config_lib.load_module(path)
  if not hasattr(module, "get_sweep"):
    raise config_lib.ConfigError(f"{path}: defines no get_sweep()")
  sweep = module.get_sweep(arg) if arg else module.get_sweep()
  runs, seen = [], set()
  for overrides in sweep:
    overrides = dict(overrides)
    variant = overrides.pop("arg", arg)
    spec = f"{path}:{variant}" if variant else path
    config = config_lib.load_file(spec)
    for key, value in overrides.items():  # as the command line will switch them
      kind, _, field = key.partition(".")
      if field == "name" and kind in config_lib.ENTRY_SECTIONS:
        config_lib.switch_entry(config, kind, value)
    for key in overrides:  # a typo fails here, before anything runs
      message = config_lib.unknown_path_message(config, key)
      if message:
        raise config_lib.ConfigError(f"{path} get_sweep(): {message}")
    label = ({"arg": variant} if variant and variant != arg else {}) | overrides
    name = run_name(label)
    if name in seen:
      raise config_lib.ConfigError(f"{path} get_sweep(): two runs are both named {name!r}")
    seen.add(name)
    workdir = Path(root) / Path(path).stem / name
    flags_ = [f"--config={spec}", *(f"--config.{k}={_format(v)}" for k, v in overrides.items())]
    runs.append(SweepRun(name, workdir, [*flags_, f"--workdir={workdir}"]))
  return runs


def run_local(runs: list[SweepRun], parallel: int) -> list[str]:
  """Runs the runs that are not finished, `parallel` at a time; returns the failures."""
  pending = [r for r in runs if r.status() != "finished"]
  for r in runs:
    if r.status() == "finished":
      logging.info("finished already: %s", r.workdir)
  active: list[tuple[SweepRun, subprocess.Popen, object]] = []
  failures = []
  while pending or active:
    while pending and len(active) < parallel:
      run = pending.pop(0)
      run.workdir.mkdir(parents=True, exist_ok=True)
      log = open(run.workdir.parent / f"{run.name}.log", "a")  # noqa: SIM115  closed below
      logging.info("starting %s", " ".join(run.command()))
      active.append(
        (run, subprocess.Popen(run.command(), stdout=log, stderr=subprocess.STDOUT), log)
      )
    time.sleep(0.2)
    for entry in list(active):
      run, process, log = entry
      if process.poll() is not None:
        log.close()
        active.remove(entry)
        if process.returncode:
          failures.append(f"{run.name}: exit {process.returncode} (log {log.name})")
        logging.info("done (exit %d): %s", process.returncode, run.workdir)
  return failures


def submit(runs: list[SweepRun], launcher: str, launcher_flags: list[str]) -> list[str]:
  failures = []
  for run in runs:
    if run.status() == "finished":
      continue
    command = ["bash", LAUNCHERS[launcher], *launcher_flags, "--", *run.train_flags]
    result = subprocess.run(command, cwd=config_lib.REPO_ROOT, check=False)
    if result.returncode:
      failures.append(f"{run.name}: {LAUNCHERS[launcher]} exit {result.returncode}")
  return failures


def define_flags():
  """Defined on the command line only, so that the entry points import together."""
  flags.DEFINE_string("config", None, "Config file with get_sweep(), path.py[:arg].")
  flags.DEFINE_string("root", "runs/sweeps", "Where the runs' workdirs go.")
  flags.DEFINE_integer("parallel", 1, "Runs at a time (local launcher).")
  flags.DEFINE_bool("list", False, "Print the runs and their status; run nothing.")
  flags.DEFINE_enum("launcher", "local", ["local", "slurm", "tpu"], "Where runs go.")
  flags.DEFINE_list("launcher_flags", [], "Flags for launch/slurm.sh or tpu_vm.sh.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS.config:
    cli.usage_error("--config is required")
  try:
    runs = expand(flags.FLAGS.config, flags.FLAGS.root)
  except config_lib.ConfigError as e:
    cli.usage_error(str(e))
  if flags.FLAGS.list:
    for run in runs:
      print(f"{run.status():10s} {run.workdir}")
    return
  if flags.FLAGS.launcher == "local":
    failures = run_local(runs, max(1, flags.FLAGS.parallel))
  else:
    failures = submit(runs, flags.FLAGS.launcher, flags.FLAGS.launcher_flags)
  for line in failures:
    print(f"FAILED {line}", file=sys.stderr)
  print(f"{len(runs) - len(failures)}/{len(runs)} runs finished or submitted")
  sys.exit(1 if failures else 0)


if __name__ == "__main__":
  define_flags()
  app.run(main)
