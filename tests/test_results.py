"""Sweeps, results tables, the regression gate and scaling-law fits."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from research import config as config_lib
from research import results, scaling, sweep

SWEEP_FILE = textwrap.dedent(
  """
  import importlib.util, pathlib
  from research import sweep

  spec = importlib.util.spec_from_file_location(
    "softmax", pathlib.Path(r"{root}") / "experiments" / "mnist_softmax.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)

  def get_config(arg=None):
    config = module.get_config()
    config.data.data_dir, config.data.raw_dir = r"{data_dir}", r"{raw_dir}"
    config.data.eval_split = "test[:500]"
    config.num_train_steps, config.checkpoint_every_steps, config.log_every_steps = 40, 20, 20
    return config

  def get_sweep(arg=None):
    return sweep.product(sweep.zip_(**{{"optimizer.learning_rate": [0.5, 0.1]}}), sweep.seeds(1))
  """
)


def test_sweep_helpers_expand_grids_zips_and_seeds():
  runs = sweep.grid(**{"optimizer.learning_rate": [1e-3, 1e-2], "model.dropout": [0.0, 0.1]})
  assert len(runs) == 4 and runs[1] == {"optimizer.learning_rate": 1e-3, "model.dropout": 0.1}
  assert sweep.zip_(a=[1, 2], b=[3, 4]) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
  assert len(sweep.product(sweep.zip_(a=[1, 2]), sweep.seeds(3))) == 6
  assert (
    sweep.run_name({"optimizer.learning_rate": 0.001, "seed": 2}) == "learning_rate=0.001,seed=2"
  )
  assert sweep.run_name({"model.dropout": 0.1, "data.dropout": 0.2}) == (
    "model.dropout=0.1,data.dropout=0.2"
  )
  assert sweep.run_name({"model.widths": (64, 32), "arg": "size=cpu30"}) == (
    "widths=64-32,size=cpu30"
  )


def _write_sweep(tmp_path, tfds_data_dir, mnist_raw_dir, body=SWEEP_FILE):
  path = tmp_path / "softmax_sweep.py"
  path.write_text(body.format(root=config_lib.REPO_ROOT, data_dir=tfds_data_dir,
                              raw_dir=mnist_raw_dir))  # fmt: skip
  return path


def test_sweep_names_are_stable_and_typos_fail_before_running(tmp_path):
  path = _write_sweep(tmp_path, "", "")
  first = sweep.expand(str(path), tmp_path / "runs")
  assert [r.name for r in first] == ["learning_rate=0.5,seed=0", "learning_rate=0.1,seed=0"]
  assert [r.workdir for r in sweep.expand(str(path), tmp_path / "runs")] == [
    r.workdir for r in first
  ]
  assert first[0].train_flags[-2:] == [
    "--config.seed=0",
    f"--workdir={tmp_path / 'runs' / 'softmax_sweep' / 'learning_rate=0.5,seed=0'}",
  ]
  bad = SWEEP_FILE.replace("optimizer.learning_rate", "optimizer.learning_rat")
  with pytest.raises(config_lib.ConfigError, match="optimizer.learning_rat: unknown key"):
    sweep.expand(str(_write_sweep(tmp_path, "", "", bad)), tmp_path / "runs")
  # A sweep over optimizers: keys of the entry each run switches to are valid.
  switch = SWEEP_FILE.replace(
    '"optimizer.learning_rate": [0.5, 0.1]',
    '"optimizer.name": ["momentum", "momentum"], "optimizer.nesterov": [True, False]',
  )
  runs = sweep.expand(str(_write_sweep(tmp_path, "", "", switch)), tmp_path / "runs")
  assert "--config.optimizer.nesterov=True" in runs[0].train_flags
  typo = switch.replace("optimizer.nesterov", "optimizer.nesterof")
  with pytest.raises(config_lib.ConfigError, match="optimizer.nesterof: unknown key"):
    sweep.expand(str(_write_sweep(tmp_path, "", "", typo)), tmp_path / "runs")


def test_sweep_skips_finished_runs_and_resumes_unfinished_ones(
  tmp_path, mnist, tfds_data_dir, mnist_raw_dir
):
  del mnist
  runs = sweep.expand(str(_write_sweep(tmp_path, tfds_data_dir, mnist_raw_dir)), tmp_path / "r")
  assert [r.status() for r in runs] == ["new", "new"]
  assert sweep.run_local(runs, parallel=2) == []
  assert [r.status() for r in runs] == ["finished", "finished"]
  # Finished runs are not started again.
  before = [(r.workdir / "metrics.jsonl").stat().st_mtime_ns for r in runs]
  assert sweep.run_local(runs, parallel=1) == []
  assert [(r.workdir / "metrics.jsonl").stat().st_mtime_ns for r in runs] == before
  # A run killed after its step-20 checkpoint: its last checkpoint and final records are gone.
  unfinished = runs[1].workdir
  import shutil

  shutil.rmtree(unfinished / "checkpoints" / "40")
  lines = (unfinished / "metrics.jsonl").read_text().splitlines()
  (unfinished / "metrics.jsonl").write_text(
    "\n".join(line for line in lines if json.loads(line)["step"] <= 20) + "\n"
  )
  assert runs[1].status() == "unfinished"
  assert sweep.run_local(runs, parallel=1) == []
  log = (unfinished.parent / f"{runs[1].name}.log").read_text()
  assert "resumed from checkpoint at step 20" in log
  assert runs[1].status() == "finished"


def _fake_run(root, name, lr, seed, accuracy, loss=0.5):
  workdir = root / name
  workdir.mkdir(parents=True)
  config = {"seed": seed, "optimizer": {"learning_rate": lr}, "data": {"eval_split": "test"}}
  (workdir / "config.json").write_text(
    json.dumps({"config": config, "derived": {"total_steps": 10}})
  )
  records = [
    {"step": 10, "split": "train", "time": 1.0, "metrics": {"loss": 2 * loss}},
    {
      "step": 5,
      "split": "test",
      "time": 1.0,
      "metrics": {"accuracy": accuracy + 0.5, "loss": loss},
    },
    {"step": 10, "split": "test", "time": 2.0, "metrics": {"accuracy": accuracy, "loss": loss}},
  ]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return workdir


def test_table_groups_seeds_and_shows_only_differing_keys(tmp_path):
  dirs = [_fake_run(tmp_path, f"a{s}", 0.1, s, acc) for s, acc in enumerate((0.8, 0.9, 1.0))]
  dirs += [_fake_run(tmp_path, f"b{s}", 0.2, s, acc) for s, acc in enumerate((0.5, 0.7))]
  runs = [results.load_run(d) for d in dirs]
  header, rows = results.table(runs, ["accuracy", "test/accuracy:best", "test/loss:5"])
  assert header == [
    "run",
    "optimizer.learning_rate",
    "accuracy",
    "test/accuracy:best",
    "test/loss:5",
  ]
  assert rows[0] == ["a0 (+2)", "0.1", "0.9000 ± 0.1000 (n=3)", "1.4000 ± 0.1000 (n=3)",
                     "0.5000 ± 0.0000 (n=3)"]  # fmt: skip
  assert rows[1][:3] == ["b0 (+1)", "0.2", "0.6000 ± 0.1414 (n=2)"]
  header, rows = results.table(runs, ["accuracy"], group_seeds=False)
  assert header == ["run", "optimizer.learning_rate", "seed", "accuracy"] and len(rows) == 5
  latex = results.render(header, rows, "latex")
  assert latex.startswith("\\begin{tabular}{llll}") and "optimizer.learning\\_rate" in latex
  assert results.render(header, rows, "csv").splitlines()[1] == "a0,0.1,0,0.8000"
  comparison = results.compare(runs[0], runs[3])
  assert "optimizer.learning_rate: 0.1 -> 0.2" in comparison and "accuracy: 0.8 -> 0.5 (-0.3)" in (
    comparison
  )


def test_check_fails_when_a_baseline_leaves_its_tolerance(tmp_path):
  _fake_run(tmp_path, "runs/mnist", 0.1, 0, 0.99)
  gate = tmp_path / "baselines.md"
  gate.write_text(
    "# Baselines\n\n## Regression gate\n\n| run | metric | expected | tolerance | command |\n"
    "|---|---|---|---|---|\n| `runs/mnist` | `test/accuracy` | 0.99 | 0.005 | `python -m x` |\n\n"
    "after the table\n"
  )
  assert results.check(gate, root=tmp_path) == []
  metrics = tmp_path / "runs/mnist/metrics.jsonl"  # doctored: the final accuracy drops
  metrics.write_text(metrics.read_text().replace('"accuracy": 0.99', '"accuracy": 0.97'))
  assert results.check(gate, root=tmp_path) == [
    "runs/mnist: test/accuracy = 0.97, outside 0.99 ± 0.005"
  ]
  assert "no config.json" in results.check(gate, root=tmp_path / "elsewhere")[0]


def test_power_law_fit_recovers_known_exponents():
  rng = np.random.default_rng(0)
  n = np.geomspace(1e4, 3e6, 8)
  loss = (1.7 + 60.0 / n**0.35) * np.exp(rng.normal(0, 0.002, n.shape))
  fit = scaling.fit_power_law(n, loss, bootstrap=50)
  assert fit.params["alpha"] == pytest.approx(0.35, rel=0.02)
  assert fit.params["E"] == pytest.approx(1.7, rel=0.02)
  low, high = fit.intervals["alpha"]
  assert low < fit.params["alpha"] < high
  kaplan = scaling.fit_power_law(n, 3.0 * (n / 1e4) ** -0.076, offset=False)  # no offset
  assert kaplan.params["alpha"] == pytest.approx(0.076, rel=0.02) and kaplan.params["E"] == 0.0


def test_joint_law_fit_and_compute_optimal_size():
  n, d = (a.ravel() for a in np.meshgrid(np.geomspace(1e4, 1e6, 5), np.geomspace(1e6, 1e8, 4)))
  truth = {"E": 1.5, "A": 400.0, "alpha": 0.34, "B": 2000.0, "beta": 0.28}
  loss = truth["E"] + truth["A"] / n ** truth["alpha"] + truth["B"] / d ** truth["beta"]
  fit = scaling.fit_joint(n, d, loss)
  for key in ("alpha", "beta", "E"):
    assert fit.params[key] == pytest.approx(truth[key], rel=0.02), key
  optimum = scaling.compute_optimal(fit, 1e15)
  sizes = np.geomspace(1e3, 1e9, 20001)  # brute force along C = 6 N D
  brute = sizes[np.argmin(fit.predict(sizes, 1e15 / (6 * sizes)))]
  assert optimum["N"] == pytest.approx(brute, rel=2e-3)


def test_sweep_submits_each_unfinished_run_through_the_slurm_launcher(tmp_path, capfd):
  runs = sweep.expand(str(_write_sweep(tmp_path, "", "")), tmp_path / "runs")
  assert sweep.submit(runs, "slurm", ["--dry_run", "--nodes=2"]) == []
  out = capfd.readouterr().out
  for run in runs:
    assert f"# then: sbatch {run.workdir}/slurm.sbatch" in out
  assert out.count("srun") == 2 and "#SBATCH --nodes=2" in out


def test_plot_draws_learning_curves_by_step_and_by_time(tmp_path):
  runs = [results.load_run(_fake_run(tmp_path, f"r{s}", 0.1, s, 0.8 + 0.1 * s)) for s in (0, 1)]
  for x in ("step", "time"):
    out = tmp_path / f"curves_{x}.png"
    results.plot(runs, "test/loss", x, out)
    assert out.stat().st_size > 5000 and out.read_bytes()[:4] == b"\x89PNG"
