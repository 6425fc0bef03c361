"""Evaluators, chosen by name in `config.evaluators.names`, run by training
(every `eval_every_steps` and at the end) and by `python -m research.evaluate`
on any checkpoint.

    loss            loss and accuracy; for sequences also perplexity and bits per
                    token (per character for character LMs)         basic.py
    bleu            sacrebleu BLEU of beam search (translation; at the end only)
    classification  top-k accuracy, per-class precision/recall/F1, macro-F1,
                    ROC-AUC (one-vs-rest), confusion matrix (CSV and PNG)
    fewshot         frozen features, closed-form ridge regression on k examples
                    per class of the train split, averaged over draws

An evaluator is a class registered in `research.registry.evaluators`, built
once per run with the `Setup`, and called with the variables to evaluate and
their step: `metrics = evaluator(variables, step)`. Evaluators that need
per-example outputs use `Setup.predict`, which visits every example of a
split exactly once, in order, on any number of devices and processes
(padding rows are masked; it checks that every index came back once).
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any

from absl import logging

from research import config as config_lib
from research import registry


@dataclasses.dataclass
class Setup:
  """What an evaluator may use; one per run (research.experiment.Experiment's parts)."""

  exp: Any  # research.experiment.Experiment
  output_dir: Path | None  # where evaluators write files (process 0 only); None: nowhere

  @property
  def config(self):
    return self.exp.config

  @property
  def dataset(self):
    return self.exp.dataset

  @property
  def model(self):
    return self.exp.model

  @property
  def split(self) -> str:
    return self.exp.config.data.eval_split

  def file_name(self, kind: str, step: int, suffix: str) -> Path | None:
    """`<output_dir>/<kind>_<split>_<step>.<suffix>`, or None where this process writes nothing."""
    if self.output_dir is None or self.exp.process_index != 0:
      return None
    split = re.sub(r"[^\w.-]+", "_", self.split).strip("_")
    return self.output_dir / f"{kind}_{split}_{step}.{suffix}"

  def jit(self, fn):
    """fn(variables, batch) -> outputs, jitted on the mesh; outputs replicated to every process."""
    import jax

    return jax.jit(
      fn,
      in_shardings=(self.exp.variables_sharding, self.exp.batch_sharding),
      out_shardings=self.exp.replicated,
    )

  def jit_per_example(self, fn):
    """For `predict`: fn(variables, batch) -> {key: per-row outputs}, jitted, with each
    row's mask and index beside them."""
    return self.jit(lambda v, batch: (fn(v, batch), batch["mask"], batch["index"]))

  def batches(self, arrays: dict):
    """Global eval batches of `arrays` (each process loads its slice), with `mask` and `index`."""
    from research import parallel
    from research.data import loader

    for local in loader.eval_batches(
      arrays, self.config.eval_batch_size, self.exp.process_index, self.exp.process_count
    ):
      yield parallel.global_batch(local, self.exp.batch_sharding)

  def predict(self, jitted, variables, arrays: dict) -> dict:
    """{key: numpy array with one row per example of `arrays`, in order}; `jitted` comes
    from `jit_per_example`. Each example is visited exactly once (checked)."""
    import jax
    import numpy as np

    parts: dict[str, list] = {}
    indices = []
    for batch in self.batches(arrays):
      outputs, mask, index = jax.device_get(jitted(variables, batch))
      for key, value in outputs.items():
        parts.setdefault(key, []).append(np.asarray(value)[mask])
      indices.append(index[mask])
    num_examples = len(next(iter(arrays.values())))
    seen = np.concatenate(indices)
    if not np.array_equal(seen, np.arange(num_examples)):
      raise AssertionError(f"evaluation visited {len(seen)} rows, not each of {num_examples} once")
    return {key: np.concatenate(value) for key, value in parts.items()}


def names(config, dataset) -> list[str]:
  """config.evaluators.names, or the default: loss (+ bleu where the dataset generates)."""
  chosen = config_lib.evaluator_names(config.evaluators)
  if chosen:
    return chosen
  return ["loss"] + (["bleu"] if hasattr(dataset, "generation_metrics") else [])


class Evaluation:
  """Every configured evaluator, run in order; their metrics merged into one dict."""

  def __init__(self, exp, output_dir: Path | None):
    setup = Setup(exp, output_dir)
    self.evaluators = [
      (n, registry.evaluators.get(n)(setup)) for n in names(exp.config, exp.dataset)
    ]

  def __call__(self, variables, step: int, final: bool = True) -> dict:
    metrics = {}
    for name, evaluator in self.evaluators:
      if getattr(evaluator, "final_only", False) and not final:
        continue
      t0 = time.perf_counter()
      metrics.update(evaluator(variables, step))
      logging.info("[TIMING] evaluator %s: %.1fs", name, time.perf_counter() - t0)
    return metrics
