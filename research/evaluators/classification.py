"""`classification`: the per-class picture of a classifier, computed by scikit-learn's metrics.

Reports accuracy, top-k accuracy, macro precision/recall/F1 and one-vs-rest
ROC-AUC (macro over classes) as metrics; writes per-class precision, recall,
F1 and support to `per_class_<split>_<step>.csv`, and the confusion matrix
(rows: true class, columns: predicted) to `confusion_<split>_<step>.csv` and
`.png`.
"""

from __future__ import annotations

import csv

import numpy as np

from research import registry


def scores(labels_N, logits_NxK, top_k: int = 5) -> tuple[dict, dict]:
  """(scalar metrics, per-class arrays incl. the confusion matrix) for integer labels."""
  from sklearn import metrics as skm

  num_classes = logits_NxK.shape[-1]
  classes = np.arange(num_classes)
  predicted_N = np.argmax(logits_NxK, axis=-1)
  shifted = logits_NxK - logits_NxK.max(axis=-1, keepdims=True)
  probs_NxK = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
  precision, recall, f1, support = skm.precision_recall_fscore_support(
    labels_N, predicted_N, labels=classes, zero_division=0
  )
  result = {
    "accuracy": skm.accuracy_score(labels_N, predicted_N),
    "macro_precision": float(np.mean(precision)),
    "macro_recall": float(np.mean(recall)),
    "macro_f1": float(np.mean(f1)),
  }
  if top_k < num_classes:
    result[f"top{top_k}_accuracy"] = skm.top_k_accuracy_score(
      labels_N, probs_NxK, k=top_k, labels=classes
    )
  if len(np.unique(labels_N)) == num_classes:  # one-vs-rest AUC needs every class present
    result["roc_auc"] = skm.roc_auc_score(
      labels_N, probs_NxK, multi_class="ovr", average="macro", labels=classes
    )
  per_class = {
    "precision": precision,
    "recall": recall,
    "f1": f1,
    "support": support,
    "confusion": skm.confusion_matrix(labels_N, predicted_N, labels=classes),
  }
  return {k: float(v) for k, v in result.items()}, per_class


def write_files(setup, step: int, per_class: dict) -> None:
  per_class_path = setup.file_name("per_class", step, "csv")
  if per_class_path is None:
    return
  per_class_path.parent.mkdir(parents=True, exist_ok=True)
  with open(per_class_path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["class", "precision", "recall", "f1", "support"])
    for k in range(len(per_class["support"])):
      row = [per_class[key][k] for key in ("precision", "recall", "f1")]
      writer.writerow([k, *(f"{v:.6f}" for v in row), int(per_class["support"][k])])
  confusion = per_class["confusion"]
  with open(setup.file_name("confusion", step, "csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["true \\ predicted", *range(len(confusion))])
    for k, row in enumerate(confusion):
      writer.writerow([k, *row.tolist()])
  plot_confusion(
    confusion, setup.file_name("confusion", step, "png"), f"{setup.split}, step {step}"
  )


def plot_confusion(confusion, path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  num_classes = len(confusion)
  size = min(12.0, 3.0 + 0.45 * num_classes)
  fig, ax = plt.subplots(figsize=(size, size))
  ax.imshow(confusion, cmap="Blues")
  if num_classes <= 30:
    for (i, j), count in np.ndenumerate(confusion):
      color = "white" if count > confusion.max() / 2 else "black"
      ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(num_classes))
    ax.set_yticks(range(num_classes))
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  ax.set_title(f"confusion matrix: {title}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


@registry.evaluators.register("classification")
class Classification:
  def __init__(self, setup):
    import jax.numpy as jnp

    from research import step as step_lib
    from research.config import ConfigError

    if setup.dataset.eval["targets"].ndim != 1:
      raise ConfigError(
        f"config.evaluators.names: 'classification' needs one label per example; "
        f"{setup.config.data.name!r} has sequence targets"
      )
    self.setup = setup
    model = setup.model

    def logits(variables, batch):
      with setup.exp.activations():
        out = model.apply(variables, *step_lib.model_args(batch), train=False)
      return {"logits": out.astype(jnp.float32), "labels": batch["targets"]}

    self.predict = setup.jit_per_example(logits)

  def __call__(self, variables, step: int) -> dict:
    outputs = self.setup.predict(self.predict, variables, self.setup.dataset.eval)
    top_k = self.setup.config.evaluators.top_k
    metrics, per_class = scores(outputs["labels"], outputs["logits"], top_k)
    write_files(self.setup, step, per_class)
    return metrics
