"""Fashion-MNIST, a tiny Vision Transformer (patches 4x4 -> 49 tokens + class token).

Goal (issue 5): >= 90% test accuracy. Width 128, 6 layers, 4 heads, MLP 2x
(0.8M parameters: ViT-Ti's depth at two thirds of its width), AdamW with
warm-up + cosine, label smoothing 0.1, horizontal flips, 20 epochs: 89.75%
(10 epochs: 88.78%). With the ResNet's crop-and-flip augmentation, 8 epochs
underfit (86.38%, train loss 0.79): a ViT this small learns slowly from 60,000
images, so the run keeps the flips only; at 20 epochs it overfits (train
accuracy 96%), see results/baselines.md; 30 epochs overfit further (89.30%, train
accuracy 98%). Regularised 20-epoch variants trailed
it by 1-3 points at every evaluation until stopped (`:crop=1,stochastic_depth=0.1`
at 5,600 steps; `:pool=mean,stochastic_depth=0.1` at 6,600).
Variants: `fashion_mnist_vit.py:epochs=10`, `:pool=mean`, `:crop=1` (pad 2, random
crop, flips), `:stochastic_depth=0.1`, `:posemb=sincos2d` (fixed 2-D positions).
"""

from research import config as config_lib


def get_config(arg=None):
  options = config_lib.parse_arg(
    arg, epochs=20.0, pool="cls", crop=False, stochastic_depth=0.0, posemb="learned"
  )
  config = config_lib.base()
  config.data.name = "fashion_mnist"
  config.data.raw_dir = config_lib.raw_data_dir("fashion-mnist")
  config.data.pp_train = "pad(2)|random_crop(28)|flip_lr" if options.crop else "flip_lr"
  config.model = config_lib.entry(
    "model", "vit", patch_size=4, num_layers=6, num_heads=4, embed_dim=128, mlp_ratio=2,
    pool=options.pool, stochastic_depth=options.stochastic_depth,
    position_embedding=options.posemb,
  )  # fmt: skip
  config.loss.label_smoothing = 0.1
  config.optimizer = config_lib.entry(
    "optimizer", "adamw", learning_rate=1e-3, weight_decay=0.05, grad_clip_norm=1.0
  )
  config.schedule = config_lib.entry("schedule", "warmup_cosine", warmup_steps=500)
  config.global_batch_size = 128
  config.num_epochs = options.epochs
  config.log_every_steps = 100
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  return config
