"""Fault injection: interrupt a training run at random moments, resume it, and check the end.

    python -m research.faults --config=experiments/mnist_mlp.py --workdir=runs/faults \
        --trials=10 [--soak] [--config.num_train_steps=300 ...]

First one uninterrupted reference run. Then each trial kills a fresh run with
SIGKILL at a moment drawn uniformly over the reference's wall time, start-up
included (`--after_startup`: over the time after the data load; `--window=0.5,1`:
over the second half only), re-runs the same command until it finishes, and
compares the final train state (every array of params, optimizer state and
step) bitwise, and the final evaluation exactly, with the reference. `--soak`
interrupts each trial 1-3 times with SIGKILL or SIGTERM and, between runs,
damages the newest checkpoint half of the time (its array files truncated, as a
dying disk would), which the next run must move aside and fall back past.

Every other argument (`--config=...`, `--config.a.b=v`) goes to each
`python -m research.train` unchanged. The report goes to WORKDIR/report.json and
WORKDIR/report.md (and `--results=FILE.md`); exit code 0 only if every trial is
identical. Runs on one host; `research.train` itself is the thing under test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from research import config as config_lib


def train_command(train_args: list[str], workdir: Path) -> list[str]:
  return [sys.executable, "-m", "research.train", *train_args, f"--workdir={workdir}"]


# Logged by research.train once the data is loaded: the start of "training" for --after_startup.
STARTUP_DONE = "[TIMING] data load"


def run_once(
  command, log: Path, interrupt: str | None = None, at_s: float = 0.0, after_startup=False
) -> dict:
  """Runs `command`; with `interrupt`, sends that signal `at_s` seconds after the start
  (after the data is loaded, with `after_startup`)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
    filter(None, [str(config_lib.REPO_ROOT), env.get("PYTHONPATH")])
  )
  with open(log, "a") as out:
    out.write(f"\n### {' '.join(command)}  (interrupt: {interrupt} at {at_s:.1f}s)\n")
    out.flush()
    offset = out.tell()
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=out, stderr=out, env=env)
    startup_s = None
    if after_startup:
      while process.poll() is None and STARTUP_DONE not in _read_from(log, offset):
        time.sleep(0.05)
      startup_s = time.perf_counter() - start
    sent = False
    if interrupt:
      try:
        process.wait(timeout=at_s)
      except subprocess.TimeoutExpired:
        process.send_signal(getattr(signal, interrupt))
        sent = True
    code = process.wait()
  return {
    "interrupt": interrupt,
    "at_s": round(at_s, 2),
    "after_startup": after_startup,
    "sent": sent,
    "exit_code": code,
    "startup_s": None if startup_s is None else round(startup_s, 2),
    "wall_s": round(time.perf_counter() - start, 2),
  }


def _read_from(path: Path, offset: int) -> str:
  with open(path, errors="replace") as f:
    f.seek(offset)
    return f.read()


def finished_steps(workdir: Path) -> list[int]:
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def damage_newest_checkpoint(workdir: Path) -> int | None:
  """Truncates the array files of the newest finished checkpoint; returns its step."""
  steps = finished_steps(workdir)
  if not steps:
    return None
  for path in (workdir / "checkpoints" / str(steps[-1])).rglob("*"):
    if path.is_file() and path.parent.name == "d":  # OCDBT data files
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  return steps[-1]


def final_result(workdir: Path) -> tuple[int, dict, dict]:
  """(step, state arrays, final evaluation metrics) of a finished run."""
  from research import checkpoint
  from research.metrics import read_jsonl

  step, arrays = checkpoint.read_state(workdir / "checkpoints")
  config = json.loads((workdir / "config.json").read_text())
  split = config["config"]["data"]["eval_split"]
  evals = [r for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == split]
  return step, arrays, (evals[-1]["metrics"] if evals else {})


def compare(reference, trial) -> tuple[bool, str]:
  """Bitwise comparison of two final_result()s; (identical, one line saying how)."""
  import numpy as np

  (step_a, arrays_a, eval_a), (step_b, arrays_b, eval_b) = reference, trial
  if step_a != step_b:
    return False, f"final step {step_b} != {step_a}"
  if arrays_a.keys() != arrays_b.keys():
    return False, f"state arrays differ: {sorted(arrays_a.keys() ^ arrays_b.keys())}"
  same = lambda a, b: a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
  differing = [name for name in arrays_a if not same(arrays_a[name], arrays_b[name])]
  if differing:
    worst = max(
      float(np.max(np.abs(arrays_a[n].astype(np.float64) - arrays_b[n].astype(np.float64))))
      for n in differing
    )
    return False, f"{len(differing)}/{len(arrays_a)} arrays differ (max abs {worst:.3g})"
  if eval_a != eval_b:
    return False, f"final evaluation differs: {eval_b} != {eval_a}"
  return True, f"bitwise identical ({len(arrays_a)}/{len(arrays_a)} arrays, final evaluation equal)"


def run_trial(index: int, args, train_args, reference, span_s: float) -> dict:
  rng = random.Random(args.seed * 100_003 + index)
  workdir = Path(args.workdir) / f"trial_{index}"
  log = Path(args.workdir) / f"trial_{index}.log"
  command = train_command(train_args, workdir)
  events, discarded = [], []
  start, end = args.window
  for number in range(rng.randint(1, 3) if args.soak else 1):
    interrupt = rng.choice(["SIGKILL", "SIGTERM"]) if args.soak else "SIGKILL"
    at_s = rng.uniform(start, end) * span_s
    event = run_once(command, log, interrupt, at_s, after_startup=args.after_startup)
    for _ in range(3):
      if event["sent"] or number > 0:
        break
      # This run was faster than the reference and finished first: start the trial
      # again, drawing within 90% of the time this run took.
      discarded.append(event)
      shutil.rmtree(workdir)
      own_span = event["wall_s"] - (event["startup_s"] or 0.0)
      at_s = rng.uniform(start, end) * 0.9 * min(span_s, own_span)
      event = run_once(command, log, interrupt, at_s, after_startup=args.after_startup)
    event["checkpoints_after"] = finished_steps(workdir)
    if args.soak and event["sent"] and rng.random() < 0.5:
      event["damaged_step"] = damage_newest_checkpoint(workdir)
    events.append(event)
  last = run_once(command, log)
  events.append(last)
  trial = {"trial": index, "events": events, "discarded": discarded}
  if last["exit_code"] != 0:
    return {**trial, "identical": False, "how": "final run failed"}
  identical, how = compare(reference, final_result(workdir))
  return {**trial, "identical": identical, "how": how}


def describe(trial: dict) -> str:
  parts = []
  for event in trial["events"][:-1]:
    if not event["sent"]:
      parts.append(f"finished before the {event['interrupt']} due at {event['at_s']}s (no kill)")
      continue
    saved = event["checkpoints_after"]
    when = f"{event['at_s']}s" + (" after start-up" if event["after_startup"] else "")
    text = f"{event['interrupt']} at {when} (checkpoints: {saved[-1] if saved else 'none'})"
    if event.get("damaged_step") is not None:
      text += f", damaged step {event['damaged_step']}"
    parts.append(text)
  restarts = len(trial.get("discarded", []))
  again = f" (started again {restarts}x: finished before the kill)" if restarts else ""
  return f"trial {trial['trial']}{again}: {'; '.join(parts)} -> {trial['how']}"


def write_report(args, argv, train_args, reference, trials, versions) -> str:
  passed = sum(t["identical"] for t in trials)
  mode = "soak (SIGKILL/SIGTERM, damaged checkpoints)" if args.soak else "SIGKILL"
  lines = [
    f"# Fault injection: {passed}/{len(trials)} trials bitwise identical",
    "",
    f"- mode: {mode}; seed {args.seed}; {datetime.datetime.now().isoformat(timespec='seconds')}",
    f"- command: `python -m research.faults {' '.join(argv)}`",
    f"- train arguments: `{' '.join(train_args)}`",
    f"- reference run: {reference['wall_s']:.1f} s uninterrupted, of which start-up "
    f"(imports, data load) {reference['startup_s']:.1f} s; interruptions drawn over "
    f"{'the rest' if args.after_startup else 'all of it'} (window {args.window})",
    f"- versions: {', '.join(f'{k} {v}' for k, v in versions.items())}; code: {_commit()}",
    "",
    *[f"- {describe(t)}" for t in trials],
    "",
  ]
  text = "\n".join(lines)
  root = Path(args.workdir)
  (root / "report.md").write_text(text)
  (root / "report.json").write_text(
    json.dumps({"passed": passed, "trials": trials, "versions": versions}, indent=1)
  )
  if args.results:
    Path(args.results).write_text(text)
  return text


def _commit() -> str:
  """The git commit of the code under test (runs must not see a changing working tree)."""
  try:
    head = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=config_lib.REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "research"], cwd=config_lib.REPO_ROOT,
      capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
  except OSError:
    return "unknown (no git)"
  return f"{head or 'unknown'}{' + uncommitted changes in research/' if dirty else ''}"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="empty or new directory for all runs")
  parser.add_argument("--trials", type=int, default=10)
  parser.add_argument("--soak", action="store_true")
  parser.add_argument("--seed", type=int, default=0, help="draws the interruption moments")
  parser.add_argument(
    "--window",
    type=lambda text: tuple(float(x) for x in text.split(",")),
    default=(0.0, 1.0),
    help="START,END: interrupt between these fractions of the reference's wall time",
  )
  parser.add_argument("--results", default="", help="also write the report to this .md file")
  parser.add_argument(
    "--after_startup",
    action="store_true",
    help="draw interruption moments from the end of start-up (data loaded) instead of launch",
  )
  argv = sys.argv[1:] if argv is None else argv
  args, train_args = parser.parse_known_args(argv)
  unknown = [a for a in train_args if not a.startswith("--config")]
  if unknown or not any(a.startswith("--config=") for a in train_args):
    parser.error(
      f"pass --config=FILE and --config.* overrides only; got {unknown or 'no --config'}"
    )
  root = Path(args.workdir)
  if root.exists() and any(root.iterdir()):
    print(
      f"error: --workdir={root} is not empty; fault injection needs fresh runs", file=sys.stderr
    )
    return 2
  root.mkdir(parents=True, exist_ok=True)

  reference_dir = root / "reference"
  first = run_once(
    train_command(train_args, reference_dir), root / "reference.log", after_startup=True
  )
  if first["exit_code"] != 0:
    print(f"error: the reference run failed; see {root / 'reference.log'}", file=sys.stderr)
    return 1
  print(f"reference run: {first['wall_s']:.1f} s ({first['startup_s']:.1f} s start-up)")
  span_s = first["wall_s"] - (first["startup_s"] if args.after_startup else 0.0)
  reference = final_result(reference_dir)
  trials = []
  for index in range(1, args.trials + 1):
    trials.append(run_trial(index, args, train_args, reference, span_s))
    print(describe(trials[-1]), flush=True)

  from research.versions import versions

  print(write_report(args, argv, train_args, first, trials, versions()))
  return 0 if all(t["identical"] for t in trials) else 1


if __name__ == "__main__":
  sys.exit(main())
