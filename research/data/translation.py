"""Translation data: Multi30K through research's TFDS builder, a sentencepiece
tokenizer trained on the train split, and length-bucketed step-indexed batches.

Token ids: 0 padding, 1 unknown, 2 begin (BOS), 3 end (EOS), then subwords;
one joint vocabulary for both languages. A pair becomes source = src + EOS,
decoder inputs = BOS + tgt, targets = tgt + EOS, each at most `seq_len`
(longer sentences are cut). Padded targets are -1 (ignored by the loss).

Batches: each epoch is a fresh permutation (seed, epoch); examples go to the
smallest length bucket that holds them, each bucket is cut into full global
batches in permutation order (a bucket's remainder waits for the next epoch's
draw), and the batches are shuffled (seed, epoch). Step s is a pure function of
(seed, s), as for images: resuming needs no iterator state.

Shapes: B batch, S source length, T target length, N examples.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np

from research import registry
from research.data import loader, sources

PAD, UNK, BOS, EOS = 0, 1, 2, 3
BUCKETS = (16, 24, 32, 48, 64, 96, 128)


def prepare_multi30k(raw_dir: str, data_dir: str = ""):
  """The Multi30K TFDS builder, prepared from raw_dir's original files (sha256 checked)."""
  tfds = sources._import_tfds(with_tensorflow=False)
  from research.data import multi30k_builder

  def check_raw_files(builder):
    if not raw_dir:
      raise sources.DataError(
        "multi30k: config.data.raw_dir is empty; it must name the folder of the task 1 raw "
        f"files ({', '.join(sorted(multi30k_builder.SHA256))})"
      )
    for name, expected in sorted(multi30k_builder.SHA256.items()):
      sources.verify_raw_file(Path(raw_dir) / name, expected, "multi30k")

  def download_and_prepare(builder):
    sources._import_tfds()
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=raw_dir))

  make = lambda: multi30k_builder.Multi30kEnDe(data_dir=data_dir or None)  # noqa: E731
  return sources.prepared_once(make, download_and_prepare, before=check_raw_files)


def load_pairs(builder, split: str) -> dict[str, list[str]]:
  """{"en": [...], "de": [...]} of a split, cached beside the prepared data."""
  sources.check_split(builder, split)
  cache = sources.cache_path(builder, split, ".json")
  if cache.is_file():
    return json.loads(cache.read_text(encoding="utf-8"))
  tfds = sources._import_tfds()
  pairs = {"en": [], "de": []}
  for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
    for language in pairs:
      pairs[language].append(example[language].decode("utf-8"))
  # In TFDS's order (fixed by the prepared files), not the raw files': pairs stay aligned.
  sources.write_atomically(cache, lambda path: path.write_text(json.dumps(pairs), "utf-8"))
  return pairs


def train_tokenizer(sentences: list[str], vocab_size: int, path: Path):
  """A sentencepiece unigram model over `sentences`, saved at `path` (reused if there)."""
  import sentencepiece as spm

  if not path.is_file():
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
      model_type="unigram", character_coverage=1.0, pad_id=PAD, unk_id=UNK, bos_id=BOS,
      eos_id=EOS, num_threads=1, minloglevel=2,
    )  # fmt: skip
    sources.write_atomically(path, lambda tmp: tmp.write_bytes(model.getvalue()))
    if not path.is_file():  # a read-only data_dir: keep it in memory
      return spm.SentencePieceProcessor(model_proto=model.getvalue())
  return spm.SentencePieceProcessor(model_file=str(path))


def pad_rows(rows: list[np.ndarray], length: int, value: int) -> np.ndarray:
  out = np.full((len(rows), length), value, np.int32)
  for i, row in enumerate(rows):
    out[i, : len(row)] = row
  return out


def make_examples(src_ids, tgt_ids, seq_len):
  """Token id lists -> (source rows, decoder input rows, target rows), cut to seq_len."""
  sources_ = [np.array(s[: seq_len - 1] + [EOS], np.int32) for s in src_ids]
  decoder_inputs = [np.array([BOS] + t[: seq_len - 1], np.int32) for t in tgt_ids]
  targets = [np.array(t[: seq_len - 1] + [EOS], np.int32) for t in tgt_ids]
  return sources_, decoder_inputs, targets


class BucketLoader:
  """Training batches of similar lengths for any step, on any number of processes."""

  def __init__(self, examples, buckets, global_batch_size, seed, process_index=0, process_count=1):
    self.sources, self.decoder_inputs, self.targets = examples
    pairs = zip(self.sources, self.targets, strict=True)
    lengths = np.array([max(len(s), len(t)) for s, t in pairs])
    self.bucket_of = np.searchsorted(np.array(buckets), lengths)  # smallest bucket >= length
    self.buckets, self.seed, self.global_batch_size = buckets, seed, global_batch_size
    counts = np.bincount(self.bucket_of, minlength=len(buckets))
    self.batches_per_epoch = int(np.sum(counts // global_batch_size))
    if self.batches_per_epoch == 0:
      raise sources.DataError(
        f"no length bucket holds a full batch of {global_batch_size} examples"
      )
    self._rows = loader.process_slice(global_batch_size, process_index, process_count)
    self._plans: dict[int, list[tuple[int, np.ndarray]]] = {}

  def epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    """[(bucket length, example indices of one global batch)] in this epoch's order."""
    if epoch not in self._plans:
      rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
      order = rng.permutation(len(self.sources))
      plan = []
      for bucket, length in enumerate(self.buckets):
        members = order[self.bucket_of[order] == bucket]
        for start in range(0, len(members) - self.global_batch_size + 1, self.global_batch_size):
          plan.append((length, members[start : start + self.global_batch_size]))
      plan = [plan[i] for i in rng.permutation(len(plan))]
      if len(self._plans) >= 2:
        self._plans.pop(min(self._plans))
      self._plans[epoch] = plan
    return self._plans[epoch]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, index = divmod(step, self.batches_per_epoch)
    length, indices = self.epoch_plan(epoch)[index]
    rows = indices[self._rows]
    return {
      "inputs": pad_rows([self.sources[i] for i in rows], length, PAD),
      "decoder_inputs": pad_rows([self.decoder_inputs[i] for i in rows], length, PAD),
      "targets": pad_rows([self.targets[i] for i in rows], length, -1),
    }


@dataclasses.dataclass(frozen=True)
class TranslationDataset:
  """Tokenised pairs: bucketed training batches; the eval split padded to one length."""

  train_examples: tuple
  eval: dict[str, np.ndarray]
  eval_references: list[str]  # the eval split's target sentences, as in the files
  tokenizer: object  # sentencepiece.SentencePieceProcessor
  seq_len: int
  source_language: str
  target_language: str

  @property
  def num_train_examples(self) -> int:
    """Training pairs; an epoch of BucketLoader's full batches holds slightly fewer."""
    return len(self.train_examples[0])

  @property
  def model_kwargs(self) -> dict:
    return {"vocab_size": self.tokenizer.vocab_size()}

  def train_loader(self, global_batch_size, seed, process_index=0, process_count=1):
    buckets = tuple(b for b in BUCKETS if b < self.seq_len) + (self.seq_len,)
    return BucketLoader(
      self.train_examples, buckets, global_batch_size, seed, process_index, process_count
    )

  def encode(self, sentences: list[str]) -> np.ndarray:
    """Source sentences -> padded source rows (N, S) as the model reads them."""
    ids = self.tokenizer.encode(sentences)
    rows = [np.array(s[: self.seq_len - 1] + [EOS], np.int32) for s in ids]
    return pad_rows(rows, max(len(r) for r in rows), PAD)

  def generation_metrics(self, model, params, decode_config) -> tuple[dict, list[str]]:
    """BLEU (sacrebleu, default 13a tokenisation) of beam search on the eval split
    against its reference sentences; also the translations, one per line."""
    import sacrebleu

    from research import decoding

    ids_NxT = decoding.translate(
      model, params, self.eval["inputs"], decode_config.beam_size, decode_config.length_penalty,
      decode_config.max_new_tokens, bos_id=BOS, eos_id=EOS,
    )  # fmt: skip
    hypotheses = self.decode(ids_NxT)
    bleu = sacrebleu.corpus_bleu(hypotheses, [self.eval_references])
    return {"bleu": bleu.score}, hypotheses

  def decode(self, ids_NxT) -> list[str]:
    """Token rows -> sentences, each cut at its first EOS."""
    texts = []
    for row in np.asarray(ids_NxT).tolist():
      row = row[: row.index(EOS)] if EOS in row else row
      texts.append(self.tokenizer.decode([t for t in row if t > EOS]))
    return texts


def _multi30k(source_language: str, target_language: str):
  def load(data_config) -> TranslationDataset:
    if data_config.seq_len <= 0:
      raise sources.DataError(
        f"config.data.seq_len={data_config.seq_len}: translation needs the longest sentence "
        "in tokens (> 0)"
      )
    if data_config.vocab_size <= EOS + 1:
      raise sources.DataError(
        f"config.data.vocab_size={data_config.vocab_size}: the subword vocabulary must be > 4"
      )
    for key in ("pp_train", "pp_eval"):
      if data_config[key]:
        raise sources.DataError(f"config.data.{key}={data_config[key]!r}: text takes no image ops")
    builder = prepare_multi30k(data_config.raw_dir, data_config.data_dir)
    train = load_pairs(builder, data_config.train_split)
    evaluated = load_pairs(builder, data_config.eval_split)
    model_path = sources.cache_path(builder, f"spm_unigram_{data_config.vocab_size}", ".model")
    tokenizer = train_tokenizer(train["de"] + train["en"], data_config.vocab_size, model_path)
    encode = lambda pairs, language: tokenizer.encode(pairs[language])  # noqa: E731
    train_examples = make_examples(
      encode(train, source_language), encode(train, target_language), data_config.seq_len
    )
    src, dec, tgt = make_examples(
      encode(evaluated, source_language), encode(evaluated, target_language), data_config.seq_len
    )
    src_len, tgt_len = max(map(len, src)), max(map(len, tgt))
    return TranslationDataset(
      train_examples=train_examples,
      eval={
        "inputs": pad_rows(src, src_len, PAD),
        "decoder_inputs": pad_rows(dec, tgt_len, PAD),
        "targets": pad_rows(tgt, tgt_len, -1),
      },
      eval_references=evaluated[target_language],
      tokenizer=tokenizer,
      seq_len=data_config.seq_len,
      source_language=source_language,
      target_language=target_language,
    )

  load.__doc__ = (
    f"Multi30K task 1, {source_language} -> {target_language}, a joint sentencepiece "
    "vocabulary of config.data.vocab_size trained on the train split."
  )
  return load


registry.datasets.register("multi30k_de_en")(_multi30k("de", "en"))
registry.datasets.register("multi30k_en_de")(_multi30k("en", "de"))
