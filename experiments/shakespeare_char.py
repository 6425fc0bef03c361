"""Tiny Shakespeare, character-level Transformer LM: nanoGPT's CPU ("laptop") model.

nanoGPT (README, "I only have a macbook"): 4 layers, 4 heads, width 128,
context 64, batch 12, 2000 iterations, AdamW 1e-3 (betas 0.9, 0.99), weight
decay 0.1, clip 1.0, 100 warm-up steps then cosine to 1e-4, no dropout:
validation loss about 1.88 in about 3 minutes on a laptop CPU.

Sizes (`shakespeare_char.py:size=...`):
- `cpu` (default): that model with the learning rate at 3e-3 and 1,500 steps,
  tuned here (validation loss at 1,500 steps: 1.824 at 3e-3, 1.818 at 5e-3;
  at 2,000 steps: 1.891 at nanoGPT's 1e-3, 1.794 at 2e-3, 1.739 at 3e-3).
- `nanogpt`: nanoGPT's CPU config exactly (1e-3, 2,000 steps).
- `cpu30`: 4 layers, width 192, context 128, batch 24, dropout 0.1: the 30-minute budget.
- `baby`: nanoGPT's GPU "baby GPT" (6 layers, 6 heads, width 384, context 256,
  batch 64, dropout 0.2, 5000 iterations: 1.47).
- `gpt2`: GPT-2 small's shape (12 layers, 12 heads, width 768, context 1024;
  86M parameters on 65 characters, 124M with GPT-2's 50,257 tokens) in bf16,
  batch 32, attention `auto` (cuDNN's flash attention on a GPU, XLA's own where
  cuDNN refuses): the GPU MFU benchmark of results/benchmarks_gpu.md (12-14% with
  XLA's attention on an H200: jax.nn's default, which `auto` meant until 2026-11-26;
  40.0-40.8% with cuDNN's).
- `gpt2_124m`: `gpt2` at GPT-2 small's size, 124M parameters: the embedding and
  logits have GPT-2's 50,257 tokens padded to 50,304 as nanoGPT does
  (`model.pad_vocab_to`; the 65 characters use the first rows), so the output
  layer's matmul and softmax cost what they cost GPT-2. Batch 128 (131,072 tokens a
  step; GPT-2 trained on 512 x 1,024): on an H200 under research.train 44.9-45.1% MFU
  (2026-11-28), against 43.9-44.2% at batch 64 and 42.4-42.5% at batch 32
  (results/benchmarks_gpu.md). Batch 128 holds more activations than batch 64; on a
  card of 80 GB, `--config.grad_accum_steps=2` takes the same 128 rows per update in
  microbatches of 64 (not yet measured on one).
"""

from research import config as config_lib

SIZES = {
  # layers, heads, width, context, batch, steps, dropout, peak learning rate
  "cpu": (4, 4, 128, 64, 12, 1500, 0.0, 3e-3),
  "nanogpt": (4, 4, 128, 64, 12, 2000, 0.0, 1e-3),
  "cpu30": (4, 6, 192, 128, 24, 2000, 0.1, 3e-3),
  "baby": (6, 6, 384, 256, 64, 5000, 0.2, 1e-3),
  "gpt2": (12, 12, 768, 1024, 32, 300, 0.0, 6e-4),
}
SIZES["gpt2_124m"] = SIZES["gpt2"][:4] + (128,) + SIZES["gpt2"][5:]  # vocabulary padded below
GPT2_PADDED_VOCAB = 50_304  # GPT-2's 50,257 tokens, padded to a multiple of 64 (nanoGPT)


def get_config(arg=None):
  options = config_lib.parse_arg(arg, size="cpu", steps=0)
  if options.size not in SIZES:
    raise config_lib.ConfigError(f"size={options.size!r}: valid: {', '.join(SIZES)}")
  layers, heads, width, context, batch, steps, dropout, learning_rate = SIZES[options.size]
  config = config_lib.base()
  config.data.name = "tiny_shakespeare"
  config.data.raw_dir = config_lib.raw_data_dir("tiny_shakespeare")
  config.data.eval_split = "validation"
  config.data.seq_len = context
  config.model = config_lib.entry(
    "model", "transformer_lm", num_layers=layers, num_heads=heads, embed_dim=width,
    max_len=context, dropout=dropout,
  )  # fmt: skip
  config.optimizer = config_lib.entry(
    "optimizer", "adamw", learning_rate=learning_rate, b2=0.99, weight_decay=0.1, grad_clip_norm=1.0
  )
  config.schedule = config_lib.entry("schedule", "warmup_cosine", warmup_steps=100, end_value=1e-4)
  if options.size.startswith("gpt2"):
    config.dtype = "bfloat16"
    config.model.attention = "auto"
  if options.size == "gpt2_124m":
    config.model.pad_vocab_to = GPT2_PADDED_VOCAB
  config.sharding_rules.vocab = ()  # 65 characters divide by no model axis: replicate
  config.global_batch_size = batch
  config.eval_batch_size = 64
  config.num_train_steps = options.steps or steps
  config.log_every_steps = 100
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  return config
