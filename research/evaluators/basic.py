"""The evaluators every run has: `loss` (with the language-modelling figures) and `bleu`."""

from __future__ import annotations

import math

from research import registry


@registry.evaluators.register("loss")
class Loss:
  """Mean loss (plain NLL) and accuracy over every example of the eval split; for
  next-token targets also token accuracy, perplexity and bits per token, which for
  a character vocabulary are bits per character."""

  def __init__(self, setup):
    from research import step as step_lib

    exp = setup.exp
    self.setup = setup
    self.eval_step = setup.jit(
      step_lib.make_eval_step(exp.model, exp.eval_loss_fn, exp.activations)
    )

  def __call__(self, variables, step: int) -> dict:
    import jax

    arrays = self.setup.dataset.eval
    totals = None
    for batch in self.setup.batches(arrays):
      sums = self.eval_step(variables, batch)
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    assert totals["count"] == len(arrays["targets"]), (totals["count"], len(arrays["targets"]))
    metrics = {
      "loss": totals["loss_sum"] / totals["count"],
      "accuracy": totals["correct"] / totals["count"],
    }
    if arrays["targets"].ndim > 1:  # sequences: per-token figures over every real target
      token_loss = totals["target_loss_sum"] / totals["target_count"]
      metrics["token_accuracy"] = totals["target_correct"] / totals["target_count"]
      metrics["perplexity"] = math.exp(token_loss)
      metrics["bits_per_token"] = token_loss / math.log(2)
    return metrics


@registry.evaluators.register("bleu")
class Bleu:
  """sacrebleu BLEU of beam search (config.decode) on the eval split; the
  translations go to `generated_<split>_<step>.txt`. Expensive: at the end only."""

  final_only = True

  def __init__(self, setup):
    from research.config import ConfigError

    if not hasattr(setup.dataset, "generation_metrics"):
      raise ConfigError(
        f"config.evaluators.names: 'bleu' needs a translation dataset, not "
        f"{setup.config.data.name!r}"
      )
    self.setup = setup

  def __call__(self, variables, step: int) -> dict:
    import jax

    setup = self.setup
    params = jax.device_get(variables["params"])
    metrics, lines = setup.dataset.generation_metrics(setup.model, params, setup.config.decode)
    path = setup.file_name("generated", step, "txt")
    if path is not None:
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return metrics
