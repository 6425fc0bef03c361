"""Character-level text: vocabulary, step-indexed windows, evaluation windows, Tiny Shakespeare."""

from __future__ import annotations

import numpy as np
import pytest

from research import config as config_lib
from research import registry
from research.data import sources, text


def test_char_vocab_round_trips_and_rejects_unknown_characters():
  vocab = text.CharVocab.from_texts("hello", "world\n")
  assert vocab.chars == "\ndehlorw" and vocab.size == 8
  ids = vocab.encode("hold\nworld")
  assert ids.dtype == np.int32 and vocab.decode(ids) == "hold\nworld"
  with pytest.raises(sources.DataError, match=r"outside the vocabulary: \['z'\]"):
    vocab.encode("zero")


def test_windows_are_a_pure_function_of_seed_and_step_and_split_by_process():
  tokens = np.arange(1000, dtype=np.int32)
  whole = text.WindowLoader(tokens, seq_len=8, global_batch_size=6, seed=3)
  batch = whole(17)
  assert batch["inputs"].shape == batch["targets"].shape == (6, 8)
  np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)  # next token
  np.testing.assert_array_equal(
    whole(17)["inputs"], text.WindowLoader(tokens, 8, 6, 3)(17)["inputs"]
  )
  assert not np.array_equal(whole(18)["inputs"], batch["inputs"])
  parts = [
    text.WindowLoader(tokens, 8, 6, 3, process_index=p, process_count=3)(17) for p in range(3)
  ]
  np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), batch["inputs"])
  assert batch["targets"].max() <= 999  # windows stay inside the text


def test_eval_windows_predict_every_token_after_the_first_once():
  windows = text.eval_windows(np.arange(23, dtype=np.int32), seq_len=5)
  assert windows["inputs"].shape == (4, 5)
  np.testing.assert_array_equal(windows["targets"].reshape(-1), np.arange(1, 21))
  with pytest.raises(sources.DataError, match="too few"):
    text.eval_windows(np.arange(5, dtype=np.int32), seq_len=5)


def test_tiny_shakespeare_is_prepared_by_tfds_from_the_original_file(tfds_data_dir):
  data_config = config_lib.base().data
  data_config.update(name="tiny_shakespeare", eval_split="validation", seq_len=64)
  data_config.raw_dir, data_config.data_dir = (
    config_lib.raw_data_dir("tiny_shakespeare"),
    tfds_data_dir,
  )
  dataset = registry.datasets.get("tiny_shakespeare")(data_config)
  assert dataset.vocab.size == 65 and dataset.model_kwargs == {"vocab_size": 65}
  assert len(dataset.train_tokens) == 1_003_854  # TFDS's 90% train split of input.txt
  assert dataset.vocab.decode(dataset.train_tokens[:14]) == "First Citizen:"
  assert dataset.eval["inputs"].shape == (55_769 // 64, 64)
  data_config.seq_len = 0
  with pytest.raises(sources.DataError, match="config.data.seq_len=0"):
    registry.datasets.get("tiny_shakespeare")(data_config)


def test_char_lm_trains_and_reports_perplexity(tfds_data_dir, tmp_path):
  from research import train
  from research.metrics import read_jsonl

  config = config_lib.load_file(f"{config_lib.REPO_ROOT}/experiments/shakespeare_char.py")
  config.data.data_dir = tfds_data_dir
  config.model.update(num_layers=1, num_heads=2, embed_dim=32)
  config.num_train_steps, config.log_every_steps, config.eval_every_steps = 150, 50, -1
  config.schedule.warmup_steps = 10
  final = train.train_and_evaluate(config, str(tmp_path))
  losses = [
    r["metrics"]["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"
  ]
  assert losses[0] > losses[-1] and final["loss"] < 3.3  # uniform over 65 characters: 4.17
  assert final["perplexity"] == pytest.approx(np.exp(final["loss"]))
  assert final["bits_per_token"] == pytest.approx(final["loss"] / np.log(2))
  # The run's checkpoint samples text from the command line.
  import subprocess
  import sys

  sampled = subprocess.run(
    [sys.executable, "-m", "research.generate", f"--workdir={tmp_path}", "--prompt=ROMEO:",
     "--num_tokens=40", "--num_samples=2", "--seed=1"],
    cwd=config_lib.REPO_ROOT, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert sampled.returncode == 0, sampled.stderr[-2000:]
  header, samples = sampled.stdout.split("\n", 1)
  assert header.startswith(f"# {tmp_path}, step 150")
  first, second, rest = samples.split("\n---------------\n")
  assert rest == "" and first != second  # two different draws
  assert all(s.startswith("ROMEO:") and len(s) == len("ROMEO:") + 40 for s in (first, second))
