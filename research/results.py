"""Tables, comparisons, plots and a regression gate, read from the workdirs training writes.

    python -m research.results table runs/a runs/b ... [--metrics=test/accuracy,test/loss:best]
                                    [--format=markdown|csv|latex] [--no_group_seeds]
    python -m research.results compare runs/a runs/b
    python -m research.results plot runs/a runs/b --plot_metric=train/loss [--x=step|time]
                                   --out=curves.png
    python -m research.results check results/baselines.md [--rerun]

A run is a workdir with `config.json` and `metrics.jsonl`. A metric is
`SPLIT/NAME[:WHICH]`: WHICH is `final` (the record at the run's last step; the
default), `best` (the lowest loss, perplexity or bits, the highest anything
else) or a step number. `table` has one row per run, or per group of runs that
differ only in their seed (mean ± std, n); its columns are the config keys that
differ between the rows, then the metrics. `check` reads the "Regression gate"
table of a results file (`| run | metric | expected | tolerance | command |`)
and exits 1 with one line per number outside expected ± tolerance.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from absl import app, flags

# Keys that say where a run executed, not what it computed.
IGNORED_KEYS = ("data.raw_dir", "data.data_dir", "mesh.data", "mesh.fsdp", "mesh.model")
LOWER_IS_BETTER = ("loss", "perplexity", "bits")
GATE_HEADER = "| run | metric | expected | tolerance | command |"


class ResultsError(ValueError):
  """Bad input: the message is one line."""


@dataclasses.dataclass
class Run:
  path: Path
  config: dict  # flat: "optimizer.learning_rate" -> value
  derived: dict
  records: list  # metrics.jsonl records

  @property
  def total_steps(self) -> int:
    return self.derived.get("total_steps") or max(r["step"] for r in self.records)

  @property
  def eval_split(self) -> str:
    return self.config.get("data.eval_split", "test")


def flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
  return flat


def load_run(path: str | Path) -> Run:
  from research.metrics import read_jsonl

  path = Path(path)
  config_path, metrics_path = path / "config.json", path / "metrics.jsonl"
  for required in (config_path, metrics_path):
    if not required.is_file():
      raise ResultsError(f"{path}: no {required.name} (not a training run's workdir)")
  saved = json.loads(config_path.read_text())
  return Run(path, flatten(saved["config"]), saved.get("derived", {}), read_jsonl(metrics_path))


def final_metrics(workdir: str | Path) -> dict | None:
  """The metrics of a run's evaluation at its final step, or None if it has not finished."""
  try:
    run = load_run(workdir)
  except ResultsError:
    return None
  records = [
    r for r in run.records if r["split"] == run.eval_split and r["step"] == run.total_steps
  ]
  return records[-1]["metrics"] if records else None


def is_finished(workdir: str | Path) -> bool:
  return final_metrics(workdir) is not None


def metric_value(run: Run, spec: str) -> float | None:
  """The value of `SPLIT/NAME[:WHICH]` in a run, or None where it has none."""
  name_part, _, which = spec.partition(":")
  split, _, name = name_part.rpartition("/")
  split = split or run.eval_split
  values = [(r["step"], r["metrics"][name]) for r in run.records
            if r["split"] == split and name in r["metrics"]]  # fmt: skip
  if not values:
    return None
  which = which or "final"
  if which == "final":
    at_end = [v for step, v in values if step == run.total_steps]
    return at_end[-1] if at_end else None
  if which == "best":
    lower = any(word in name for word in LOWER_IS_BETTER)
    return (min if lower else max)(v for _, v in values)
  if which.isdigit():
    at_step = [v for step, v in values if step == int(which)]
    return at_step[-1] if at_step else None
  raise ResultsError(f"metric {spec!r}: WHICH must be final, best or a step, not {which!r}")


def default_metrics(runs: list[Run]) -> list[str]:
  """Final loss, accuracy and BLEU on each run's own eval split, where any run has them."""
  names = ["loss", "accuracy", "bleu"]
  return [m for m in names if any(metric_value(r, m) is not None for r in runs)]


def differing_keys(runs: list[Run], ignore=IGNORED_KEYS) -> list[str]:
  keys = sorted({k for r in runs for k in r.config})
  return [k for k in keys if k not in ignore and len({repr(r.config.get(k)) for r in runs}) > 1]


def group_by_seed(runs: list[Run]) -> list[list[Run]]:
  """Runs whose configs are equal but for `seed`, in order of first appearance."""
  groups: dict[str, list[Run]] = {}
  for run in runs:
    same = {k: v for k, v in run.config.items() if k != "seed" and k not in IGNORED_KEYS}
    key = json.dumps(same, sort_keys=True, default=str)
    groups.setdefault(key, []).append(run)
  return list(groups.values())


def summarise(values: list[float | None]) -> str:
  present = [v for v in values if v is not None]
  if not present:
    return "-"
  if len(values) == 1:
    return f"{present[0]:.4f}"
  std = statistics.stdev(present) if len(present) > 1 else 0.0
  return f"{statistics.mean(present):.4f} ± {std:.4f} (n={len(present)})"


def table(runs: list[Run], metrics: list[str], group_seeds: bool = True, columns=()):
  """(header, rows of strings); `columns`: config keys to show instead of those that differ."""
  groups = group_by_seed(runs) if group_seeds else [[r] for r in runs]
  ignore = IGNORED_KEYS + (("seed",) if group_seeds else ())
  keys = list(columns) or (
    differing_keys([g[0] for g in groups], ignore) if len(groups) > 1 else []
  )
  header = ["run", *keys, *metrics]
  rows = []
  for group in groups:
    name = group[0].path.name if len(group) == 1 else f"{group[0].path.name} (+{len(group) - 1})"
    cells = [name] + [_cell(group[0].config.get(k)) for k in keys]
    cells += [summarise([metric_value(r, m) for r in group]) for m in metrics]
    rows.append(cells)
  return header, rows


def _cell(value) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  return str(value)


def render(header: list, rows: list, fmt: str) -> str:
  if fmt == "csv":
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()
  if fmt == "latex":
    escape = lambda s: str(s).replace("_", r"\_").replace("±", r"$\pm$").replace("%", r"\%")  # noqa: E731
    lines = [r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule",
             " & ".join(map(escape, header)) + r" \\", r"\midrule"]  # fmt: skip
    lines += [" & ".join(map(escape, row)) + r" \\" for row in rows]
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"
  escape = lambda s: str(s).replace("|", "\\|")  # noqa: E731
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def compare(a: Run, b: Run) -> str:
  lines = [f"# {a.path} -> {b.path}", "config:"]
  keys = sorted(set(a.config) | set(b.config))
  differ = [k for k in keys if k not in IGNORED_KEYS and a.config.get(k) != b.config.get(k)]
  lines += [f"  {k}: {a.config.get(k, '<absent>')!r} -> {b.config.get(k, '<absent>')!r}"
            for k in differ] or ["  (identical)"]  # fmt: skip
  lines.append(f"final metrics ({a.eval_split}):")
  names = sorted({n for r in a.records + b.records if r["split"] == a.eval_split
                  for n in r["metrics"]})  # fmt: skip
  for name in names:
    va, vb = metric_value(a, f"{a.eval_split}/{name}"), metric_value(b, f"{b.eval_split}/{name}")
    if va is not None and vb is not None:
      lines.append(f"  {name}: {va:.6g} -> {vb:.6g} ({vb - va:+.6g})")
  return "\n".join(lines) + "\n"


def plot(runs: list[Run], metric: str, x: str, out: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  split, _, name = metric.rpartition("/")
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for run in runs:
    points = [(r["step"], r["time"], r["metrics"][name]) for r in run.records
              if r["split"] == (split or run.eval_split) and name in r["metrics"]]  # fmt: skip
    if not points:
      continue
    start = min(t for _, t, _ in points)
    xs = [s if x == "step" else (t - start) / 60 for s, t, _ in points]
    ax.plot(xs, [v for _, _, v in points], marker="." if len(points) < 30 else None,
            label=run.path.name)  # fmt: skip
  ax.set_xlabel("step" if x == "step" else "wall time (min)")
  ax.set_ylabel(metric)
  if any(word in name for word in LOWER_IS_BETTER):
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)


@dataclasses.dataclass
class GateRow:
  run: str
  metric: str
  expected: float
  tolerance: float
  command: str


def gate_rows(results_file: Path) -> list[GateRow]:
  """The rows of the results file's "Regression gate" table."""
  text = results_file.read_text()
  if "## Regression gate" not in text:
    raise ResultsError(f"{results_file}: no '## Regression gate' table")
  rows, started = [], False
  for line in text.split("## Regression gate", 1)[1].splitlines():
    if not line.startswith("|"):
      if started:
        break
      continue
    started = True
    cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
    if cells[0] == "run" or set(line) <= set("|-: "):
      continue
    if len(cells) != 5:
      raise ResultsError(f"{results_file}: gate row {line!r}: needs 5 cells ({GATE_HEADER})")
    run, metric, expected, tolerance, command = cells
    rows.append(GateRow(run, metric, float(expected), float(tolerance), command))
  return rows


def check(results_file: Path, rerun: bool = False, root: Path = Path(".")) -> list[str]:
  """One line per broken row; empty when every number is within its tolerance."""
  failures = []
  for row in gate_rows(results_file):
    if rerun:
      subprocess.run(shlex.split(row.command), cwd=root, check=False)
    try:
      value = metric_value(load_run(root / row.run), row.metric)
    except ResultsError as e:
      failures.append(f"{e} (run `{row.command}`, or check --rerun)")
      continue
    if value is None:
      failures.append(f"{row.run}: no {row.metric} in its metrics.jsonl")
    elif not math.isfinite(value) or abs(value - row.expected) > row.tolerance:
      failures.append(f"{row.run}: {row.metric} = {value:.6g}, outside {row.expected:g} ± "
                      f"{row.tolerance:g}")  # fmt: skip
  return failures


def define_flags():
  """Defined on the command line only, so that the entry points import together."""
  flags.DEFINE_list("metrics", [], "[SPLIT/]NAME[:final|best|STEP]; default: loss, accuracy, bleu.")
  flags.DEFINE_enum("format", "markdown", ["markdown", "csv", "latex"], "Table format.")
  flags.DEFINE_bool("group_seeds", True, "One row per group of seeds.")
  flags.DEFINE_list("columns", [], "Config keys to show; default: those that differ.")
  flags.DEFINE_string("plot_metric", "train/loss", "plot: SPLIT/NAME.")
  flags.DEFINE_enum("x", "step", ["step", "time"], "plot: by step or by wall time.")
  flags.DEFINE_string("out", "", "plot: the PNG to write.")
  flags.DEFINE_bool("rerun", False, "check: run each row's command first.")


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("usage: python -m research.results table|compare|plot|check ARGS...")
  command, args = argv[1], argv[2:]
  try:
    if command == "check":
      if len(args) != 1:
        raise ResultsError("check takes one results file, e.g. results/baselines.md")
      failures = check(Path(args[0]), flags.FLAGS.rerun)
      for line in failures:
        print(f"FAIL {line}")
      total = len(gate_rows(Path(args[0])))
      print(f"{total - len(failures)}/{total} baseline numbers within tolerance")
      sys.exit(1 if failures else 0)
    runs = [load_run(a) for a in args]
    if not runs:
      raise ResultsError(f"{command}: give run directories")
    if command == "table":
      metrics = flags.FLAGS.metrics or default_metrics(runs)
      header, rows = table(runs, metrics, flags.FLAGS.group_seeds, flags.FLAGS.columns)
      print(render(header, rows, flags.FLAGS.format), end="")
    elif command == "compare":
      if len(runs) != 2:
        raise ResultsError("compare takes two run directories")
      print(compare(*runs), end="")
    elif command == "plot":
      if not flags.FLAGS.out:
        raise ResultsError("plot needs --out=FILE.png")
      plot(runs, flags.FLAGS.plot_metric, flags.FLAGS.x, Path(flags.FLAGS.out))
      print(f"wrote {flags.FLAGS.out}")
    else:
      raise ResultsError(f"unknown command {command!r}; valid: table, compare, plot, check")
  except ResultsError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
