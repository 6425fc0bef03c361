"""`fewshot`: how linearly separable the frozen features are from k examples per class.

As big_vision's few-shot evaluator: the features are the input of the model's
`head` layer (its pre-logits). For each draw (seed) and each k in
`config.evaluators.fewshot_shots`, k examples per class are taken from the
train split (nested: the 5-shot set contains the 1-shot set), features are
standardised by those examples' mean and deviation, a constant bias column is
appended, and a ridge regression onto +-1 one-hot targets is solved in closed
form (float64); the test examples are the whole eval split. Reported:
`fewshot_<k>shot` (mean accuracy over draws) and `fewshot_<k>shot_std`.
"""

from __future__ import annotations

import numpy as np

from research import registry
from research.config import ConfigError

BIAS = 100.0  # the appended constant column: a large value leaves the bias almost unregularised


def head_inputs(model, variables, args):
  """What the module named `head` receives when `model` runs in evaluation mode."""
  from flax import linen as nn

  captured = []

  def interceptor(next_fun, call_args, call_kwargs, context):
    if context.module.name == "head" and context.method_name == "__call__":
      captured.append(call_args[0])
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, *args, train=False)
  if not captured:
    raise ConfigError(
      f"config.evaluators.names: 'fewshot' needs a model with a layer named 'head'; "
      f"{type(model).__name__} has none"
    )
  return captured[-1]


def ridge_weights(x_NxF, labels_N, num_classes: int, l2_reg: float):
  """(weights (F+1)xK, mean, std) of the closed-form ridge regression described above."""
  x_NxF = np.asarray(x_NxF, np.float64)
  mean, std = x_NxF.mean(0), x_NxF.std(0) + 1e-5
  x_NxG = np.pad((x_NxF - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS)
  y_NxK = 2.0 * np.eye(num_classes)[labels_N] - 1.0
  n, g = x_NxG.shape
  if n >= g:  # (X'X + l2 I)^-1 X'Y
    w_GxK = np.linalg.solve(x_NxG.T @ x_NxG + l2_reg * np.eye(g), x_NxG.T @ y_NxK)
  else:  # the same, through the N x N system: X'(XX' + l2 I)^-1 Y
    w_GxK = x_NxG.T @ np.linalg.solve(x_NxG @ x_NxG.T + l2_reg * np.eye(n), y_NxK)
  return w_GxK, mean, std


def ridge_accuracy(x_train, y_train, x_test, y_test, num_classes: int, l2_reg: float) -> float:
  w_GxK, mean, std = ridge_weights(x_train, y_train, num_classes, l2_reg)
  x_test = np.pad((np.asarray(x_test, np.float64) - mean) / std, ((0, 0), (0, 1)),
                  constant_values=BIAS)  # fmt: skip
  return float(np.mean(np.argmax(x_test @ w_GxK, axis=1) == y_test))


def draw_shots(labels_N, num_classes: int, max_shots: int, seed: int) -> np.ndarray:
  """ClassesxShots indices into the train split: a random `max_shots` of each class
  (fewer if the class has fewer); the first k of each row are the k-shot set."""
  rng = np.random.default_rng(seed)
  rows = []
  for c in range(num_classes):
    members = np.flatnonzero(labels_N == c)
    if len(members) < max_shots:
      raise ConfigError(
        f"config.evaluators.fewshot_shots: class {c} has {len(members)} train examples, "
        f"fewer than {max_shots}"
      )
    rows.append(rng.permutation(members)[:max_shots])
  return np.stack(rows)


@registry.evaluators.register("fewshot")
class FewShot:
  def __init__(self, setup):
    import jax.numpy as jnp

    from research import step as step_lib
    from research.data import preprocess

    dataset, cfg = setup.dataset, setup.config.evaluators
    train = getattr(dataset, "train", None)
    if not isinstance(train, dict) or train["targets"].ndim != 1:
      raise ConfigError(
        f"config.evaluators.names: 'fewshot' needs a classification dataset held in memory, "
        f"not {setup.config.data.name!r}"
      )
    self.setup = setup
    self.shots = sorted(set(cfg.fewshot_shots))
    self.num_classes = dataset.num_classes
    draws = [
      draw_shots(train["targets"], self.num_classes, self.shots[-1], seed)
      for seed in range(cfg.fewshot_seeds)
    ]
    # Every example any draw uses, once, preprocessed as evaluation examples are.
    self.pool = np.unique(np.concatenate([d.ravel() for d in draws]))
    self.draws = [np.searchsorted(self.pool, d) for d in draws]  # rows of the pool
    pp_eval = preprocess.Pipeline(setup.config.data.pp_eval)
    self.pool_arrays = {
      "inputs": pp_eval(train["inputs"][self.pool]),
      "targets": train["targets"][self.pool],
    }
    model = setup.model

    def features(variables, batch):
      with setup.exp.activations():
        x = head_inputs(model, variables, step_lib.model_args(batch))
      return {"features": x.reshape(x.shape[0], -1).astype(jnp.float32), "labels": batch["targets"]}

    self.features = setup.jit_per_example(features)

  def __call__(self, variables, step: int) -> dict:
    setup, l2_reg = self.setup, self.setup.config.evaluators.fewshot_l2_reg
    pool = setup.predict(self.features, variables, self.pool_arrays)
    test = setup.predict(self.features, variables, setup.dataset.eval)
    metrics = {}
    for k in self.shots:
      accuracies = []
      for rows_CxS in self.draws:
        chosen = rows_CxS[:, :k].ravel()
        accuracies.append(
          ridge_accuracy(
            pool["features"][chosen],
            pool["labels"][chosen],
            test["features"],
            test["labels"],
            self.num_classes,
            l2_reg,
          )  # fmt: skip
        )
      metrics[f"fewshot_{k}shot"] = float(np.mean(accuracies))
      metrics[f"fewshot_{k}shot_std"] = float(np.std(accuracies))
    return metrics
