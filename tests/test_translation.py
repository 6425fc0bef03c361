"""Translation: the encoder-decoder, greedy and beam search, bucketed batches, Multi30K."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from helpers.xla import devices_flags

from research import config as config_lib
from research import decoding, registry
from research import step as step_lib
from research.data import translation

TINY = dict(vocab_size=40, num_layers=2, num_heads=2, embed_dim=32, max_len=24, dropout=0.0)


def tiny_model(**overrides):
  return registry.models.get("transformer_seq2seq")(**{**TINY, **overrides})


def test_cached_decoding_equals_teacher_forcing_and_source_padding_is_invisible():
  model = tiny_model()
  rng = np.random.default_rng(0)
  src = jnp.asarray(rng.integers(4, 40, (3, 7)), jnp.int32).at[0, 5:].set(0)
  dec = jnp.asarray(rng.integers(4, 40, (3, 6)), jnp.int32)
  variables = nn.meta.unbox(model.init(jax.random.key(0), src, dec))
  full_BxTxV = jax.nn.log_softmax(model.apply(variables, src, dec))
  assert full_BxTxV.shape == (3, 6, 40)
  encoded, mask = model.apply(variables, src, method=model.encode)
  cache = decoding._seq2seq_cache(model, variables["params"], encoded, mask)
  for t in range(6):
    step_BxV, cache = decoding._decode_step(
      model, variables["params"], cache, dec[:, t], encoded, mask
    )
    np.testing.assert_allclose(step_BxV, full_BxTxV[:, t], atol=2e-5)
  # More padding on the source changes nothing.
  padded = jnp.pad(src, ((0, 0), (0, 5)))
  np.testing.assert_allclose(
    jax.nn.log_softmax(model.apply(variables, padded, dec)), full_BxTxV, atol=2e-5
  )


class MarkovTranslator(nn.Module):
  """A fake translator: the next token's probabilities depend on the previous token only.

  From BOS: a 0.6, b 0.4. After a: EOS 0.3, a 0.35, b 0.35. After b: EOS 1.0.
  Greedy takes a, a, a, ... (best sequence at each step); the most likely whole
  sentence is "b EOS" (0.4 against 0.18 for "a EOS"), which beam search finds.
  """

  max_len: int = 8

  def encode(self, inputs_BxS):
    return jnp.zeros(inputs_BxS.shape + (1,)), inputs_BxS != 0

  @nn.compact
  def decode(self, tokens_BxT, encoded, mask, decode=False):
    counter = self.variable("cache", "steps", jnp.zeros, (tokens_BxT.shape[0],), jnp.int32)
    counter.value = counter.value + 1  # a per-row cache leaf, reordered with its beam
    table = np.full((6, 6), 1e-9)
    table[2, 4], table[2, 5] = 0.6, 0.4
    table[4, 3], table[4, 4], table[4, 5] = 0.3, 0.35, 0.35
    table[5, 3] = 1.0
    table[3, 3] = 1.0
    return jnp.log(jnp.asarray(table, jnp.float32))[tokens_BxT]


def test_beam_search_finds_the_likelier_sentence_that_greedy_misses():
  model, src = MarkovTranslator(), jnp.ones((2, 3), jnp.int32)
  greedy = np.asarray(decoding.greedy(model, {}, src, 4, bos_id=2, eos_id=3))
  assert greedy[0, 0] == 4  # "a" first
  beams = np.asarray(decoding.beam_search(model, {}, src, 2, 4, 0.6, bos_id=2, eos_id=3))
  np.testing.assert_array_equal(beams, [[5, 3, 3, 3], [5, 3, 3, 3]])


def test_seq2seq_learns_to_reverse_sequences():
  """A short learning test: reverse 3-6 random tokens; greedy decoding gets them right."""
  model = tiny_model(num_layers=1, embed_dim=64, num_heads=4)
  rng = np.random.default_rng(0)

  def batch(n):
    rows = [rng.integers(4, 40, rng.integers(3, 7)).tolist() for _ in range(n)]
    src, dec, tgt = translation.make_examples(rows, [r[::-1] for r in rows], seq_len=8)
    return {
      "inputs": translation.pad_rows(src, 8, 0),
      "decoder_inputs": translation.pad_rows(dec, 8, 0),
      "targets": translation.pad_rows(tgt, 8, -1),
    }, rows

  tx = optax.adam(optax.warmup_cosine_decay_schedule(0, 3e-3, 50, 600))
  example = batch(1)[0]["inputs"]
  state = step_lib.init_state(model, tx, jax.random.key(0), example)
  loss = registry.losses.get("softmax_xent")()
  train_step = jax.jit(step_lib.make_train_step(model, tx, loss, lambda s: 0.0, jax.random.key(1)))
  for _ in range(600):
    state, metrics = train_step(state, batch(64)[0])
  test, rows = batch(50)
  out = decoding.translate(model, state.params, test["inputs"], beam_size=1, max_new_tokens=8)
  pairs = zip(out, rows, strict=True)
  correct = [list(o[: len(r)]) == r[::-1] and o[len(r)] == 3 for o, r in pairs]
  assert np.mean(correct) >= 0.9, (np.mean(correct), float(metrics["loss"]))


def examples(n=300, seed=0):
  rng = np.random.default_rng(seed)
  rows = [rng.integers(4, 100, rng.integers(1, 40)).tolist() for _ in range(n)]
  return translation.make_examples(rows, [r[: len(r) // 2 + 1] for r in rows], seq_len=32)


def test_bucket_loader_is_a_function_of_the_step_and_splits_over_processes():
  data = examples()
  one = translation.BucketLoader(data, (16, 24, 32), 8, seed=1)
  halves = [translation.BucketLoader(data, (16, 24, 32), 8, 1, i, 2) for i in range(2)]
  seen = []
  for step in range(one.batches_per_epoch):
    batch = one(step)
    assert batch["inputs"].shape[1] in (16, 24, 32)
    assert set(batch) == {"inputs", "decoder_inputs", "targets"}
    for key in batch:
      parts = np.concatenate([h(step)[key] for h in halves])
      np.testing.assert_array_equal(parts, batch[key])
    # Targets are the decoder inputs shifted by one; padding is -1 there, 0 elsewhere.
    real = batch["targets"] >= 0
    np.testing.assert_array_equal(real, batch["decoder_inputs"] != 0)
    seen.extend(one.epoch_plan(0)[step][1].tolist())
  assert len(seen) == len(set(seen)) > 0.8 * 300  # each example at most once per epoch
  again = translation.BucketLoader(data, (16, 24, 32), 8, seed=1)  # a resumed run
  np.testing.assert_array_equal(one(5)["inputs"], again(5)["inputs"])
  assert not np.array_equal(one.epoch_plan(0)[0][1], one.epoch_plan(1)[0][1])


@pytest.fixture(scope="session")
def multi30k_data_dir(tmp_path_factory):
  raw_dir = config_lib.raw_data_dir("multi30k_de_en")
  assert raw_dir, "the real Multi30K files are needed in ../shared/data/multi30k"
  return raw_dir, str(tmp_path_factory.mktemp("tfds_multi30k"))


def data_config(raw_dir, data_dir, **overrides):
  config = config_lib.load_file(f"{config_lib.REPO_ROOT}/experiments/multi30k_de_en.py").data
  config.raw_dir, config.data_dir = raw_dir, data_dir
  config.vocab_size = 1000
  config.update(overrides)
  return config


def test_multi30k_prepares_from_the_original_files_and_tokenises(multi30k_data_dir):
  dataset = registry.datasets.get("multi30k_de_en")(data_config(*multi30k_data_dir))
  assert len(dataset.train_examples[0]) == 29_000
  assert len(dataset.eval["inputs"]) == len(dataset.eval_references) == 1_000
  assert dataset.model_kwargs == {"vocab_size": 1000}
  sentence = "Ein Mann fährt mit dem Fahrrad."
  assert dataset.tokenizer.decode(dataset.tokenizer.encode(sentence)) == sentence
  src = dataset.encode([sentence])
  assert src[0, -1] == translation.EOS and (src > 0).all()
  # English references line up with the German sources.
  german = dataset.tokenizer.decode([t for t in dataset.eval["inputs"][0] if t > 3])
  assert german and dataset.eval_references[0]
  (model_path,) = Path(multi30k_data_dir[1]).rglob("spm_unigram_1000.model")
  assert model_path.stat().st_size > 0  # saved beside the prepared data


def test_multi30k_names_a_missing_or_damaged_file(tmp_path, multi30k_data_dir):
  from research.data.sources import DataError

  raw = tmp_path / "raw"
  shutil.copytree(multi30k_data_dir[0], raw)
  (raw / "val.de.gz").write_bytes(b"not gzip")
  with pytest.raises(DataError, match=r"checksum mismatch for .*val.de.gz: got sha256"):
    registry.datasets.get("multi30k_de_en")(data_config(str(raw), str(tmp_path / "d")))
  (raw / "val.de.gz").unlink()
  with pytest.raises(DataError, match=r"missing raw file .*val.de.gz for multi30k"):
    registry.datasets.get("multi30k_de_en")(data_config(str(raw), str(tmp_path / "d")))


def test_data_fsdp_and_tensor_parallel_losses_equal_one_device(multi30k_data_dir, tmp_path):
  """The encoder-decoder on 8 fake devices (data, FSDP, tensor parallel) as on one."""
  raw_dir, data_dir = multi30k_data_dir
  meshes = ("1,1,1", "8,1,1", "2,4,1", "4,1,2")
  losses = {}
  for devices, group in ((1, meshes[:1]), (8, meshes[1:])):
    out = tmp_path / f"losses_{devices}.json"
    env = dict(
      os.environ,
      XLA_FLAGS=devices_flags(devices),
      PYTHONPATH=str(config_lib.REPO_ROOT),
    )
    specs = [f"seq2seq:{mesh}:30:{mesh.replace(',', '_')}:warmup_cosine" for mesh in group]
    result = subprocess.run(
      [sys.executable, "tests/helpers/mesh_runs.py", str(out), data_dir, raw_dir,
       str(tmp_path / "runs"), *specs],
      capture_output=True, text=True, cwd=config_lib.REPO_ROOT, env=env, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    losses.update({k.split(":")[1]: v for k, v in json.loads(out.read_text()).items()})
  assert len(losses["1,1,1"]) == 30
  for mesh in meshes[1:]:
    assert losses[mesh] == pytest.approx(losses["1,1,1"], rel=1e-5), mesh
  table = (tmp_path / "runs" / "4_1_2" / "sharding.md").read_text()
  assert "| decoder_blocks_0/cross_attention/query | (32, 4, 8) | (embed, heads, kv) |" in table
  assert "(fsdp, model, -)" in table


def test_train_reports_bleu_and_generate_translates(multi30k_data_dir, tmp_path):
  from research import train
  from research.metrics import read_jsonl

  raw_dir, data_dir = multi30k_data_dir
  config = config_lib.load_file(f"{config_lib.REPO_ROOT}/experiments/multi30k_de_en.py")
  config.data.update(raw_dir=raw_dir, data_dir=data_dir, vocab_size=1000, eval_split="test[:64]")
  config.model.update(num_layers=1, embed_dim=32, num_heads=2)
  config.global_batch_size, config.eval_batch_size, config.num_train_steps = 32, 32, 30
  config.schedule.warmup_steps = 5
  config.decode.update(beam_size=2, max_new_tokens=12)
  final = train.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= final["bleu"] <= 100.0 and final["perplexity"] < 1000
  (record,) = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "bleu" in r["metrics"]]
  assert record["metrics"]["bleu"] == final["bleu"]
  lines = (tmp_path / "generated_test_64_30.txt").read_text().splitlines()
  assert len(lines) == 64
  result = subprocess.run(
    [sys.executable, "-m", "research.generate", f"--workdir={tmp_path}",
     "--source=Ein Hund läuft.", "--source=Zwei Männer.", "--beam_size=2"],
    capture_output=True, text=True, cwd=config_lib.REPO_ROOT, timeout=300,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Ein Hund läuft.\n  -> " in result.stdout and "Zwei Männer.\n  -> " in result.stdout
