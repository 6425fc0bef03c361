"""Scaling laws: power-law fits to sweep results, bootstrap intervals, compute-optimal sizes.

    L(N)    = E + A / N**alpha                      (Kaplan et al. 2020, with an offset)
    L(D)    = E + B / D**beta
    L(N, D) = E + A / N**alpha + B / D**beta       (Hoffmann et al. 2022, "approach 3")

Fits minimise the squared error of log L (so every point weighs by its relative
error; the joint form with a Huber loss as Hoffmann et al.) with scipy's
least_squares from a grid of starting points, keeping the best. Intervals are
percentiles of refits to bootstrap resamples of the points. With training
compute C = 6 N D, the loss-optimal split of a budget is
N_opt = G (C/6)**(beta/(alpha+beta)), G = (alpha A / (beta B))**(1/(alpha+beta)).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class Fit:
  params: dict  # E, A, alpha (and B, beta for the joint form)
  intervals: dict  # name -> (low, high), 95% bootstrap percentiles; {} without bootstrap
  residuals: np.ndarray  # log L - log fit, per point
  form: str  # "power" or "joint"

  def predict(self, n, d=None):
    p = self.params
    if self.form == "power":
      return p["E"] + p["A"] / np.asarray(n, float) ** p["alpha"]
    return (
      p["E"]
      + p["A"] / np.asarray(n, float) ** p["alpha"]
      + p["B"] / np.asarray(d, float) ** p["beta"]
    )


def _power(theta, n):
  log_e, log_a, alpha = theta
  return np.exp(log_e) + np.exp(log_a) / n**alpha


def _joint(theta, n, d):
  log_e, log_a, alpha, log_b, beta = theta
  return np.exp(log_e) + np.exp(log_a) / n**alpha + np.exp(log_b) / d**beta


def _best_fit(residual_fn, starts, loss: str = "linear", f_scale: float = 1.0):
  from scipy import optimize

  best = None
  for start in starts:
    try:
      result = optimize.least_squares(residual_fn, np.array(start, float), loss=loss,
                                      f_scale=f_scale, max_nfev=5000)  # fmt: skip
    except (ValueError, FloatingPointError):
      continue
    if np.all(np.isfinite(result.x)) and (best is None or result.cost < best.cost):
      best = result
  if best is None:
    raise ValueError("no fit converged")
  return best.x


def fit_power_law(n, loss, bootstrap: int = 0, seed: int = 0, offset: bool = True) -> Fit:
  """L(x) = E + A / x**alpha for x = model size N (or data size D); `offset=False`
  fixes E = 0, Kaplan et al.'s form L = (x_c / x)**alpha (a line in log-log)."""
  n, loss = np.asarray(n, float), np.asarray(loss, float)
  if len(n) < (3 if offset else 2):
    raise ValueError(f"too few points for a power law: {len(n)}")
  scale = np.exp(np.mean(np.log(n)))  # fit in units of the geometric mean size: better conditioned

  def solve(n_, loss_, start=None):
    if not offset:
      slope, intercept = np.polyfit(np.log(n_), np.log(loss_), 1)
      return {"E": 0.0, "A": float(np.exp(intercept)), "alpha": float(-slope)}
    residual = lambda theta: np.log(_power(theta, n_ / scale)) - np.log(loss_)  # noqa: E731
    starts = (
      [start]
      if start is not None
      else [
        (np.log(e * loss_.min()), np.log(max(loss_.max() - e * loss_.min(), 1e-3)), a)
        for e, a in itertools.product((0.01, 0.5, 0.9), (0.05, 0.3, 1.0))
      ]
    )
    log_e, log_a, alpha = _best_fit(residual, starts)
    return {"E": np.exp(log_e), "A": np.exp(log_a) * scale**alpha, "alpha": alpha}

  params = solve(n, loss)
  start = (np.log(max(params["E"], 1e-300)), np.log(params["A"] / scale ** params["alpha"]),
           params["alpha"])  # fmt: skip
  intervals = _bootstrap(lambda idx: solve(n[idx], loss[idx], start), len(n), bootstrap, seed)
  fitted = params["E"] + params["A"] / n ** params["alpha"]
  return Fit(params, intervals, np.log(loss) - np.log(fitted), "power")


def fit_joint(n, d, loss, bootstrap: int = 0, seed: int = 0, huber_delta: float = 1e-3) -> Fit:
  """L(N, D) = E + A / N**alpha + B / D**beta, Hoffmann et al.'s Huber loss on log L."""
  n, d, loss = (np.asarray(x, float) for x in (n, d, loss))
  if len(n) < 5:
    raise ValueError(f"the joint law has 5 parameters; got {len(n)} points")
  n_scale, d_scale = np.exp(np.mean(np.log(n))), np.exp(np.mean(np.log(d)))

  def solve(n_, d_, loss_, start=None):
    residual = lambda theta: np.log(_joint(theta, n_ / n_scale, d_ / d_scale)) - np.log(loss_)  # noqa: E731
    low, spread = loss_.min(), max(loss_.max() - loss_.min(), 1e-3)
    starts = (
      [start]
      if start is not None
      else [
        (np.log(e * low), np.log(spread), a, np.log(spread), b)
        for e, a, b in itertools.product((0.3, 0.8), (0.1, 0.5), (0.1, 0.5))
      ]
    )
    log_e, log_a, alpha, log_b, beta = _best_fit(residual, starts, "huber", huber_delta)
    return {"E": np.exp(log_e), "A": np.exp(log_a) * n_scale**alpha, "alpha": alpha,
            "B": np.exp(log_b) * d_scale**beta, "beta": beta}  # fmt: skip

  params = solve(n, d, loss)
  log_a = np.log(params["A"] / n_scale ** params["alpha"])
  log_b = np.log(params["B"] / d_scale ** params["beta"])
  start = (np.log(max(params["E"], 1e-300)), log_a, params["alpha"], log_b, params["beta"])
  refit = lambda idx: solve(n[idx], d[idx], loss[idx], start)  # noqa: E731
  intervals = _bootstrap(refit, len(n), bootstrap, seed)
  fit = Fit(params, intervals, np.zeros(len(n)), "joint")
  fit.residuals = np.log(loss) - np.log(fit.predict(n, d))
  return fit


def _bootstrap(refit, num_points: int, samples: int, seed: int) -> dict:
  """95% percentile intervals of refits (from the full fit's solution) to resampled points;
  {} for fewer than 4 points (resamples of 3 distinct points are the points themselves)."""
  if not samples or num_points < 4:
    return {}
  rng = np.random.default_rng(seed)
  draws = []
  for _ in range(samples):
    idx = rng.integers(0, num_points, num_points)
    if len(np.unique(idx)) < 3:
      continue
    try:
      draws.append(refit(idx))
    except ValueError:
      continue
  if not draws:
    return {}
  return {k: (float(np.percentile([p[k] for p in draws], 2.5)),
              float(np.percentile([p[k] for p in draws], 97.5))) for k in draws[0]}  # fmt: skip


def compute_optimal(fit: Fit, compute: float) -> dict:
  """The N and D that minimise the joint law at C = 6 N D FLOPs, and the loss there."""
  p = fit.params
  a, b = p["alpha"], p["beta"]
  g = (a * p["A"] / (b * p["B"])) ** (1.0 / (a + b))
  n_opt = g * (compute / 6.0) ** (b / (a + b))
  d_opt = compute / (6.0 * n_opt)
  return {"N": float(n_opt), "D": float(d_opt), "loss": float(fit.predict(n_opt, d_opt))}


def plot_fit(x, loss, fit: Fit, path, xlabel: str, groups=None, group_label: str = "") -> None:
  """Data points and the fitted curve(s) on log-log axes, residuals below."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  x, loss = np.asarray(x, float), np.asarray(loss, float)
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                    gridspec_kw={"height_ratios": [3, 1]})  # fmt: skip
  grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 200)
  keys = sorted(set(groups)) if groups is not None else [None]
  for key in keys:
    mask = np.ones(len(x), bool) if key is None else np.asarray(groups) == key
    label = None if key is None else f"{group_label}={key:g}"
    points = top.scatter(x[mask], loss[mask], label=label, zorder=3)
    curve = fit.predict(grid) if fit.form == "power" else fit.predict(grid, np.full_like(grid, key))
    top.plot(grid, curve, color=points.get_facecolor()[0], alpha=0.7)
    bottom.scatter(x[mask], fit.residuals[mask], color=points.get_facecolor()[0])
  p = fit.params
  title = ", ".join(f"{k}={v:.3g}" for k, v in p.items())
  top.set(xscale="log", yscale="log", ylabel="loss", title=title)
  top.grid(alpha=0.3, which="both")
  if groups is not None:
    top.legend(fontsize=8)
  bottom.axhline(0, color="gray", lw=0.8)
  bottom.set(xscale="log", xlabel=xlabel, ylabel="log residual")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# --- The study: python -m research.scaling --sweep=experiments/shakespeare_scaling.py


def non_embedding_params(workdir) -> int:
  """Parameters of a run's checkpoint other than token and position embeddings."""
  from research import checkpoint

  _, state = checkpoint.read_state(Path(workdir) / "checkpoints")
  return int(sum(v.size for k, v in state.items()
                 if k.startswith("params/") and "embedding" not in k))  # fmt: skip


def collect(runs) -> list[dict]:
  """One point per finished run: N (non-embedding parameters), D (tokens trained), loss."""
  from research import results

  points = []
  for run in runs:
    loaded = results.load_run(run.workdir)
    loss = results.metric_value(loaded, "loss")
    config = loaded.config
    tokens = loaded.total_steps * config["global_batch_size"] * config["data.seq_len"]
    size = non_embedding_params(run.workdir)
    points.append({"run": run.name, "N": size, "D": tokens, "loss": loss})
  return points


def _interval(fit: Fit, key: str) -> str:
  if key not in fit.intervals:
    return f"{fit.params[key]:.3g} (no interval)"
  low, high = fit.intervals[key]
  return f"{fit.params[key]:.3g} [{low:.3g}, {high:.3g}]"


def report(points: list[dict], sweep_spec: str, root: str, plot_path: Path, bootstrap: int) -> str:
  from research.versions import versions

  n = np.array([p["N"] for p in points], float)
  d = np.array([p["D"] for p in points], float)
  loss = np.array([p["loss"] for p in points], float)
  at_max_d, at_max_n = d == d.max(), n == n.max()
  fits = {  # name -> (fit, x, loss)
    f"L(N) = (N_c/N)^alpha_N (Kaplan's form) at D = {d.max():,.0f}": (
      fit_power_law(n[at_max_d], loss[at_max_d], bootstrap, offset=False)),
    f"L(N) = E + A/N^alpha_N at D = {d.max():,.0f}": (
      fit_power_law(n[at_max_d], loss[at_max_d], bootstrap)),
    f"L(D) = (D_c/D)^alpha_D (Kaplan's form) at N = {n.max():,.0f}": (
      fit_power_law(d[at_max_n], loss[at_max_n], bootstrap, offset=False)),
    f"L(D) = E + B/D^alpha_D at N = {n.max():,.0f}": (
      fit_power_law(d[at_max_n], loss[at_max_n], bootstrap)),
  }  # fmt: skip
  joint = fit_joint(n, d, loss, bootstrap)
  fit_n = list(fits.values())[0]
  plot_fit(n, loss, joint, plot_path, "non-embedding parameters N", groups=d, group_label="D")
  plot_fit(n[at_max_d], loss[at_max_d], fit_n, plot_path.with_name(plot_path.stem + "_n.png"),
           "non-embedding parameters N")  # fmt: skip
  lines = [
    "# Scaling: Tiny Shakespeare character LMs", "",
    f"{len(points)} runs: {len(set(n))} model sizes ({n.min():,.0f} to {n.max():,.0f} "
    f"non-embedding parameters, {n.max() / n.min():.0f}x) x {len(set(d))} data sizes "
    f"({d.min():,.0f} to "
    f"{d.max():,.0f} training tokens). Loss: final validation loss (nats per character). "
    "Fits minimise squared log error; [intervals]: 95% bootstrap over points "
    f"({bootstrap} resamples).", "",
    "| fit | E | A (or B) | exponent | rms log residual |", "|---|---|---|---|---|",
  ]  # fmt: skip
  for name, fit in fits.items():
    rms = float(np.sqrt(np.mean(fit.residuals**2)))
    lines.append(f"| {name} | {_interval(fit, 'E')} | {_interval(fit, 'A')} | "
                 f"{_interval(fit, 'alpha')} | {rms:.4f} |")  # fmt: skip
  rms = float(np.sqrt(np.mean(joint.residuals**2)))
  lines += [
    f"| L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al.) | {_interval(joint, 'E')} | "
    f"A = {_interval(joint, 'A')}, B = {_interval(joint, 'B')} | "
    f"alpha = {_interval(joint, 'alpha')}, beta = {_interval(joint, 'beta')} | {rms:.4f} |", "",
    f"![joint fit]({plot_path.name}) ![L(N)]({plot_path.stem}_n.png)", "",
    "Compute-optimal sizes from the joint fit (C = 6 N D):", "",
    "| C (FLOPs) | N_opt | D_opt | predicted loss |", "|---|---|---|---|",
  ]  # fmt: skip
  for compute in (1e12, 1e13, 1e14, 1e15):
    opt = compute_optimal(joint, compute)
    lines.append(f"| {compute:.0e} | {opt['N']:,.0f} | {opt['D']:,.0f} | {opt['loss']:.3f} |")
  lines += ["", "| run | N | D | validation loss |", "|---|---|---|---|"]
  lines += [f"| {p['run']} | {p['N']:,} | {p['D']:,} | {p['loss']:.4f} |" for p in points]
  command = f"python -m research.scaling --sweep={sweep_spec} --root={root}"
  lines += ["", f"Command: `{command}` (runs the sweep's missing runs, then fits). "
            f"Library versions: {json.dumps(versions())}", ""]  # fmt: skip
  return "\n".join(lines)


def main(argv):
  from absl import app, flags

  from research import sweep

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  args = flags.FLAGS
  runs = sweep.expand(args.sweep, args.root)
  failures = sweep.run_local(runs, args.parallel)
  if failures:
    raise SystemExit("failed runs:\n" + "\n".join(failures))
  out = Path(args.out)
  text = report(collect(runs), args.sweep, args.root, out.with_suffix(".png"), args.bootstrap)
  discussion = out.with_name(out.stem + "_discussion.md")
  if discussion.exists():  # the hand-written comparison with the literature stays
    text += "\n" + discussion.read_text()
  out.write_text(text)
  print(text)


def define_flags():
  from absl import flags

  flags.DEFINE_string(
    "sweep", "experiments/shakespeare_scaling.py", "Config file with get_sweep()."
  )
  flags.DEFINE_string("root", "runs/sweeps", "Where the runs' workdirs go.")
  flags.DEFINE_integer("parallel", 1, "Runs at a time.")
  flags.DEFINE_string("out", "results/scaling.md", "The report; its plot goes beside it (.png).")
  flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for the intervals.")


if __name__ == "__main__":
  from absl import app

  define_flags()
  app.run(main)
