"""Evaluators: exact arithmetic, every example once on 8 devices, and research.evaluate
reproducing what training reported."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers.xla import devices_flags

from research import config as config_lib
from research import evaluate, train
from research.evaluators import classification, fewshot
from research.metrics import read_jsonl

EVALUATORS = "loss,classification,fewshot"


def test_fewshot_ridge_regression_is_exact_on_a_separable_problem():
  rng = np.random.default_rng(0)
  centres_KxF = rng.normal(size=(5, 16)) * 10.0
  train_labels = np.repeat(np.arange(5), 5)  # 5-shot
  test_labels = np.repeat(np.arange(5), 200)
  x_train = centres_KxF[train_labels] + rng.normal(size=(25, 16))
  x_test = centres_KxF[test_labels] + rng.normal(size=(1000, 16))
  for l2_reg in (0.1, 1024.0):  # the dual (N < F+1) and primal systems both
    assert fewshot.ridge_accuracy(x_train, train_labels, x_test, test_labels, 5, l2_reg) == 1.0
  # The closed form is ridge regression: scikit-learn's solver gives the same weights.
  from sklearn.linear_model import Ridge

  for x, y in ((x_train, train_labels), (np.tile(x_train, (4, 1)), np.tile(train_labels, 4))):
    w, mean, std = fewshot.ridge_weights(x, y, 5, 3.0)
    design = np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=fewshot.BIAS)
    reference = Ridge(alpha=3.0, fit_intercept=False, solver="cholesky")
    reference.fit(design, 2.0 * np.eye(5)[y] - 1.0)
    np.testing.assert_allclose(w, reference.coef_.T, rtol=1e-7, atol=1e-10)


def test_fewshot_draws_are_nested_per_class_and_deterministic():
  labels = np.repeat(np.arange(3), [50, 50, 40])
  draw = fewshot.draw_shots(labels, 3, 25, seed=1)
  assert draw.shape == (3, 25)
  assert all((labels[row] == c).all() for c, row in enumerate(draw))
  np.testing.assert_array_equal(draw, fewshot.draw_shots(labels, 3, 25, seed=1))
  assert not np.array_equal(draw, fewshot.draw_shots(labels, 3, 25, seed=2))
  with pytest.raises(config_lib.ConfigError, match="class 2 has 40 train examples"):
    fewshot.draw_shots(labels, 3, 41, seed=0)


def test_classification_scores_by_hand():
  labels = np.array([0, 0, 1, 1, 2, 2])
  logits = np.array([[3, 1, 0], [3, 1, 0], [0, 3, 1], [3, 1, 0], [0, 1, 3], [1, 0, 3]], float)
  metrics, per_class = classification.scores(labels, logits, top_k=2)
  assert metrics["accuracy"] == pytest.approx(5 / 6)
  np.testing.assert_array_equal(per_class["confusion"], [[2, 0, 0], [1, 1, 0], [0, 0, 2]])
  np.testing.assert_allclose(per_class["precision"], [2 / 3, 1, 1])
  np.testing.assert_allclose(per_class["recall"], [1, 0.5, 1])
  f1 = [0.8, 2 / 3, 1.0]
  np.testing.assert_allclose(per_class["f1"], f1)
  assert metrics["macro_f1"] == pytest.approx(np.mean(f1))
  assert metrics["top2_accuracy"] == 1.0  # the one miss has its label second
  assert 0.5 < metrics["roc_auc"] <= 1.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist, tfds_data_dir, mnist_raw_dir):
  """A small MLP trained on MNIST with every classification evaluator, and its config."""
  del mnist
  config = config_lib.load_file(f"{config_lib.REPO_ROOT}/experiments/mnist_mlp.py")
  config.data.update(data_dir=tfds_data_dir, raw_dir=mnist_raw_dir, eval_split="test[:1003]")
  config.model.widths = (32,)
  config.global_batch_size, config.eval_batch_size = 64, 80  # 80 does not divide 1,003
  config.num_train_steps, config.checkpoint_every_steps = 60, 60
  config.evaluators.names = EVALUATORS
  config.evaluators.fewshot_shots = (1, 5)
  workdir = tmp_path_factory.mktemp("trained")
  final = train.train_and_evaluate(config, str(workdir))
  return workdir, config, final


def test_training_writes_every_evaluator(trained):
  workdir, _, final = trained
  for key in ("loss", "accuracy", "macro_f1", "top5_accuracy", "roc_auc", "fewshot_5shot"):
    assert key in final, key
  assert 0.5 < final["accuracy"] < 1.0
  assert final["fewshot_1shot"] < final["fewshot_5shot"] < 1.0
  with open(workdir / "confusion_test_1003_60.csv") as f:
    rows = list(csv.reader(f))[1:]
  assert sum(int(v) for row in rows for v in row[1:]) == 1003  # every example once
  assert (workdir / "confusion_test_1003_60.png").stat().st_size > 1000
  assert (workdir / "per_class_test_1003_60.csv").exists()


def test_evaluate_reproduces_the_metrics_training_reported(trained, tmp_path):
  workdir, _, _ = trained
  reported = [r for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] != "train"][-1]
  step, metrics = evaluate.evaluate_checkpoint(str(workdir), output_dir=str(tmp_path))
  assert step == 60
  assert metrics.keys() == reported["metrics"].keys()
  for key, value in reported["metrics"].items():
    assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
  record = json.loads((tmp_path / "metrics_test_1003_60.json").read_text())
  assert record["step"] == 60 and record["versions"]["jax"]
  assert len(record["config_hash"]) == 12


def test_evaluate_rejects_a_checkpoint_that_does_not_fit(trained, tmp_path):
  workdir, config, _ = trained
  config = copy.deepcopy(config)
  config.model.widths = (16,)
  message = r"does not fit config.model: shape mismatch: .*params/hidden_0/kernel \(784, 32\)"
  with pytest.raises(config_lib.ConfigError, match=message):
    evaluate.evaluate_checkpoint(str(workdir / "checkpoints" / "60"), config, str(tmp_path))


def _evaluate_on(devices: int, workdir, tfds_data_dir, mnist_raw_dir, out):
  env = dict(os.environ, XLA_FLAGS=devices_flags(devices))
  result = subprocess.run(
    [
      sys.executable, "-m", "research.evaluate", f"--checkpoint={workdir}",
      "--config=experiments/mnist_mlp.py", "--config.model.widths=(32,)",
      f"--config.data.data_dir={tfds_data_dir}", f"--config.data.raw_dir={mnist_raw_dir}",
      "--config.data.eval_split=test[:1003]", "--config.eval_batch_size=80",
      "--config.evaluators.fewshot_shots=(1,5)", f"--evaluators={EVALUATORS}",
      f"--output_dir={out}",
    ],
    capture_output=True, text=True, cwd=config_lib.REPO_ROOT, env=env, timeout=600,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads((out / "metrics_test_1003_60.json").read_text())


def test_evaluators_count_each_example_once_on_8_devices(trained, tfds_data_dir, mnist_raw_dir,
                                                         tmp_path):  # fmt: skip
  workdir, _, final = trained
  eight = _evaluate_on(8, workdir, tfds_data_dir, mnist_raw_dir, tmp_path / "eight")
  assert eight["mesh"] == {"data": 8, "fsdp": 1, "model": 1}
  with open(tmp_path / "eight" / "confusion_test_1003_60.csv") as f:
    rows = list(csv.reader(f))[1:]
  assert sum(int(v) for row in rows for v in row[1:]) == 1003
  for key, value in final.items():  # 1,003 examples in batches of 80 split 8 ways
    assert eight["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


def test_evaluate_names_a_missing_checkpoint(tmp_path):
  with pytest.raises(evaluate.EvaluateError, match="no such directory"):
    evaluate.evaluate_checkpoint(str(tmp_path / "nothing"))
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  with pytest.raises(evaluate.EvaluateError, match="no config.json .* pass --config"):
    evaluate.evaluate_checkpoint(str(tmp_path / "run"))
