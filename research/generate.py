"""Print samples from a trained language model, or translations from a trained translator.

    python -m research.generate --workdir=runs/shakespeare_char --prompt="ROMEO:" \
        --num_tokens=500 --temperature=0.8 --top_k=200
    python -m research.generate --workdir=runs/multi30k_de_en \
        --source="Ein Mann fährt Fahrrad." --beam_size=4

Reads the run's config.json, its dataset's vocabulary, and the latest (or
--step) checkpoint; samples with a key/value cache (research.decoding).
Defaults follow nanoGPT's sample.py (temperature 0.8, top-k 200).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

from research import runtime

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir.")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step; -1: the latest.")
_PROMPT = flags.DEFINE_string("prompt", "\n", "Text the samples continue.")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 500, "New tokens per sample.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples (one batch).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 200, "Keep the k most likely tokens; 0 keeps all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Keep the nucleus of this probability; 1 keeps all.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_SOURCE = flags.DEFINE_multi_string("source", [], "Translators: sentences to translate.")
_BEAM_SIZE = flags.DEFINE_integer("beam_size", 4, "Translators: beams; 1 is greedy.")


class GenerateError(ValueError):
  """Bad input: the message is one line."""


def load_model(workdir: Path, step: int | None):
  """(model, params, vocabulary, step) of a run's checkpoint."""
  import ml_collections

  from research import checkpoint, optim, registry

  config_path = workdir / "config.json"
  if not config_path.is_file():
    raise GenerateError(f"--workdir={workdir}: no config.json (not a training run's workdir)")
  config = ml_collections.ConfigDict(json.loads(config_path.read_text())["config"])
  dataset = registry.datasets.get(config.data.name)(config.data)
  if not hasattr(dataset, "vocab") and not hasattr(dataset, "tokenizer"):
    raise GenerateError(f"config.data.name={config.data.name!r} is not a text dataset")
  model = registry.build_model(config, dataset)
  try:
    step, state = checkpoint.read_tree(workdir / "checkpoints", step)
  except FileNotFoundError as e:
    raise GenerateError(str(e)) from None
  return model, optim.eval_params(state["params"], state.get("opt_state")), dataset, step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  runtime.tune_malloc()  # before JAX starts its threads
  import jax
  import numpy as np

  from research import decoding
  from research.data.sources import DataError

  try:
    step = None if _STEP.value < 0 else _STEP.value
    model, params, dataset, step = load_model(Path(_WORKDIR.value), step)
    if hasattr(dataset, "tokenizer"):
      return translate(model, params, dataset, step)
    vocab = dataset.vocab
    prompt_P = vocab.encode(_PROMPT.value)
  except (GenerateError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  prompt_BxP = np.tile(prompt_P[None], (_NUM_SAMPLES.value, 1))
  tokens_BxN = decoding.sample(
    model, params, prompt_BxP, _NUM_TOKENS.value, jax.random.key(_SEED.value),
    _TEMPERATURE.value, _TOP_K.value, _TOP_P.value,
  )  # fmt: skip
  print(f"# {_WORKDIR.value}, step {step}, temperature {_TEMPERATURE.value}, top-k {_TOP_K.value}")
  for row in tokens_BxN:
    print(_PROMPT.value + vocab.decode(row))
    print("---------------")


def translate(model, params, dataset, step):
  from research import decoding

  if not _SOURCE.value:
    raise GenerateError("--source is required for a translation model (repeat it for more)")
  ids_NxT = decoding.translate(model, params, dataset.encode(_SOURCE.value), _BEAM_SIZE.value)
  print(f"# {_WORKDIR.value}, step {step}, beam size {_BEAM_SIZE.value}")
  for source, translation in zip(_SOURCE.value, dataset.decode(ids_NxT), strict=True):
    print(f"{source}\n  -> {translation}")


if __name__ == "__main__":
  app.run(main)
