"""Scaling study (issue 7): Tiny Shakespeare character LMs at 6 sizes x 3 data sizes.

    python -m research.scaling --sweep=experiments/shakespeare_scaling.py --out=results/scaling.md

Sizes span 144x in non-embedding parameters (12 L D^2: 12k to 1.77M) at
context 64 and batch 16; data sizes are the tokens trained on (250, 750 and
2,000 steps of 1,024 tokens: 0.26M to 2.05M, about 2 epochs of the 1M-character
train split at the most). Every run has its own full warm-up + cosine schedule
(Hoffmann et al.'s setting: one run per (N, D)), AdamW at 3e-3, no dropout.
`shakespeare_scaling.py:size=s4,steps=750` is one cell.

`schedule=wsd`: warm-up (100 steps), stable, and a linear decay to 0 over the last
20% (warmup_stable_decay), keeping every 200th step's checkpoint: the 2,000-step
run's stable phase is then every shorter budget's, and `--config.init.mode=continue
--config.init.checkpoint=WORKDIR/checkpoints/600` decays it over 750 steps
(results/wsd.md).
"""

from research import config as config_lib

SIZES = {  # layers, heads, width
  "s1": (1, 2, 32),
  "s2": (2, 3, 48),
  "s3": (2, 4, 64),
  "s4": (3, 4, 96),
  "s5": (4, 4, 128),
  "s6": (4, 6, 192),
}
STEPS = (250, 750, 2000)


def get_config(arg=None):
  options = config_lib.parse_arg(arg, size="s5", steps=750, schedule="cosine")
  if options.size not in SIZES:
    raise config_lib.ConfigError(f"size={options.size!r}: valid: {', '.join(SIZES)}")
  if options.schedule not in ("cosine", "wsd"):
    raise config_lib.ConfigError(f"schedule={options.schedule!r}: valid: cosine, wsd")
  layers, heads, width = SIZES[options.size]
  config = config_lib.base()
  config.data.name = "tiny_shakespeare"
  config.data.raw_dir = config_lib.raw_data_dir("tiny_shakespeare")
  config.data.eval_split = "validation"
  config.data.seq_len = 64
  config.model = config_lib.entry(
    "model", "transformer_lm", num_layers=layers, num_heads=heads, embed_dim=width, max_len=64
  )
  config.optimizer = config_lib.entry(
    "optimizer", "adamw", learning_rate=3e-3, b2=0.99, weight_decay=0.1, grad_clip_norm=1.0
  )
  warmup = min(100, options.steps // 5)
  config.schedule = config_lib.entry(
    "schedule", "warmup_cosine", warmup_steps=warmup, end_value=1e-4
  )
  if options.schedule == "wsd":
    config.schedule = config_lib.entry(
      "schedule", "warmup_stable_decay", warmup_steps=100, decay_fraction=0.2
    )
  config.sharding_rules.vocab = ()
  config.global_batch_size = 16
  config.eval_batch_size = 64
  config.num_train_steps = options.steps
  config.log_every_steps = min(100, options.steps)
  config.checkpoint_every_steps = options.steps
  config.max_to_keep = 1
  if options.schedule == "wsd":  # the stable phase's points to decay from
    config.checkpoint_every_steps = config.keep_every_steps = 200
  return config


def get_sweep(arg=None):
  del arg
  return [{"arg": f"size={size},steps={steps}"} for size in SIZES for steps in STEPS]
