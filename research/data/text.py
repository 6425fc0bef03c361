"""Character-level text: a vocabulary, a step-indexed window loader, and Tiny Shakespeare.

Training examples are windows of `seq_len + 1` characters at offsets drawn
from (seed, step) alone, as nanoGPT samples them, so resuming needs no iterator
state; inputs are the first `seq_len`, targets the last `seq_len`. Evaluation
cuts its split into consecutive windows that predict every character after the
first exactly once (a last partial window is dropped).

Shapes: B batch, L length (seq_len), N number of windows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from research import registry
from research.data import loader, sources


@dataclasses.dataclass(frozen=True)
class CharVocab:
  """Characters sorted by code point -> ids 0..V-1 (nanoGPT's shakespeare_char encoding)."""

  chars: str

  @classmethod
  def from_texts(cls, *texts: str) -> CharVocab:
    return cls("".join(sorted(set().union(*map(set, texts)))))

  @property
  def size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    lookup = np.full(max(map(ord, self.chars)) + 1, -1, np.int32)
    lookup[[ord(c) for c in self.chars]] = np.arange(self.size, dtype=np.int32)
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    if codes.size and codes.max() >= lookup.size or (lookup[codes] < 0).any():
      unknown = sorted({c for c in text if c not in self.chars})
      raise sources.DataError(f"characters outside the vocabulary: {unknown[:10]}")
    return lookup[codes]

  def decode(self, ids) -> str:
    return "".join(self.chars[i] for i in np.asarray(ids).reshape(-1))


class WindowLoader:
  """Training windows of `seq_len + 1` tokens for any step, on any number of processes."""

  def __init__(self, tokens, seq_len, global_batch_size, seed, process_index=0, process_count=1):
    if len(tokens) <= seq_len + 1:
      raise sources.DataError(f"{len(tokens)} tokens: too few for windows of {seq_len + 1}")
    self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
    self.global_batch_size = global_batch_size
    self._rows = loader.process_slice(global_batch_size, process_index, process_count)

  def global_offsets(self, step: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([self.seed, step]))
    return rng.integers(0, len(self.tokens) - self.seq_len, self.global_batch_size)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    """This process's slice of the global batch of `step`: inputs and targets (B/P, L)."""
    offsets_B = self.global_offsets(step)[self._rows]
    windows_BxL1 = self.tokens[offsets_B[:, None] + np.arange(self.seq_len + 1)]
    return {"inputs": windows_BxL1[:, :-1], "targets": windows_BxL1[:, 1:]}


def eval_windows(tokens: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """Consecutive windows: inputs (N, L) and targets (N, L), each target predicted once."""
  num_windows = (len(tokens) - 1) // seq_len
  if num_windows < 1:
    raise sources.DataError(f"{len(tokens)} tokens: too few for one window of {seq_len + 1}")
  used = tokens[: num_windows * seq_len + 1]
  return {
    "inputs": used[:-1].reshape(num_windows, seq_len),
    "targets": used[1:].reshape(num_windows, seq_len),
  }


@dataclasses.dataclass(frozen=True)
class TextDataset:
  """A token stream for training and evaluation windows for one split."""

  train_tokens: np.ndarray
  eval: dict[str, np.ndarray]
  vocab: CharVocab
  seq_len: int

  @property
  def num_train_examples(self) -> int:
    """Windows per pass over the training text (what an epoch means here)."""
    return len(self.train_tokens) // self.seq_len

  @property
  def model_kwargs(self) -> dict:
    return {"vocab_size": self.vocab.size}

  def train_loader(self, global_batch_size, seed, process_index=0, process_count=1):
    return WindowLoader(
      self.train_tokens, self.seq_len, global_batch_size, seed, process_index, process_count
    )


def load_texts(builder, splits) -> dict[str, str]:
  """{split: the split's text} of a TFDS text dataset with one 'text' example per split
  (cached beside the prepared data as SPLIT.txt, as sources.load_arrays does)."""
  texts = {}
  for split in splits:
    sources.check_split(builder, split)
    cache = sources.cache_path(builder, split, ".txt")
    if cache.is_file():
      texts[split] = cache.read_text(encoding="utf-8")
      continue
    tfds = sources._import_tfds()
    examples = tfds.as_numpy(builder.as_dataset(split=split))
    texts[split] = "".join(example["text"].decode("utf-8") for example in examples)
    sources.write_atomically(
      cache, lambda path, t=texts[split]: path.write_text(t, encoding="utf-8")
    )
  return texts


@registry.datasets.register("tiny_shakespeare")
def tiny_shakespeare(data_config) -> TextDataset:
  """TFDS 'tiny_shakespeare' (karpathy/char-rnn's input.txt; train 90%, validation and test
  5% each), characters as tokens; the vocabulary is every character of the file (65)."""
  if data_config.seq_len <= 0:
    raise sources.DataError(
      f"config.data.seq_len={data_config.seq_len}: tiny_shakespeare needs a window length > 0"
    )
  for key in ("pp_train", "pp_eval"):
    if data_config[key]:
      raise sources.DataError(f"config.data.{key}={data_config[key]!r}: text takes no image ops")
  builder = sources.prepare("tiny_shakespeare", data_config.raw_dir, data_config.data_dir)
  texts = load_texts(builder, sorted(builder.info.splits))
  for split in (data_config.train_split, data_config.eval_split):
    if split not in texts:  # one example per split: TFDS slices would cut whole splits
      raise sources.DataError(
        f"unknown split {split!r} for tiny_shakespeare; valid: {sorted(texts)}"
      )
  vocab = CharVocab.from_texts(*texts.values())
  return TextDataset(
    train_tokens=vocab.encode(texts[data_config.train_split]),
    eval=eval_windows(vocab.encode(texts[data_config.eval_split]), data_config.seq_len),
    vocab=vocab,
    seq_len=data_config.seq_len,
  )
