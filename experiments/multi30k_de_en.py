"""Multi30K German -> English, encoder-decoder Transformer (3 + 3 layers, width 256, MLP 512).

Goal (issue 5): test2016 BLEU >= 30 (sacrebleu) in <= 60 minutes on the 2-core
CPU. Anchor: small Transformers in public PyTorch tutorials report about 35
BLEU on a GPU. Joint sentencepiece unigram vocabulary of 8,000 trained on the
train split; sentences bucketed by length; label smoothing 0.1; Adam (0.9,
0.98) with warm-up + cosine; beam search (4 beams, GNMT length penalty 0.6).
Variants: `multi30k_de_en.py:epochs=1`, `:layers=2,width=128`.
"""

from research import config as config_lib


def get_config(arg=None):
  options = config_lib.parse_arg(arg, epochs=10.0, layers=3, width=256)
  config = config_lib.base()
  config.data.name = "multi30k_de_en"
  config.data.raw_dir = config_lib.raw_data_dir(config.data.name)
  config.data.seq_len = 64  # tokens per sentence with BOS/EOS; the longest train pair has 57
  config.data.vocab_size = 8000
  config.data.eval_split = "test"
  config.model = config_lib.entry(
    "model", "transformer_seq2seq", num_layers=options.layers, embed_dim=options.width,
    num_heads=max(1, options.width // 64), mlp_ratio=2, max_len=128, dropout=0.1,
  )  # fmt: skip
  config.loss.label_smoothing = 0.1
  config.optimizer = config_lib.entry(
    "optimizer", "adamw", learning_rate=1e-3, b2=0.98, weight_decay=1e-4, grad_clip_norm=1.0
  )
  config.schedule = config_lib.entry("schedule", "warmup_cosine", warmup_steps=400)
  config.global_batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = options.epochs
  config.decode.max_new_tokens = 64
  config.log_every_steps = 100
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 500
  return config
