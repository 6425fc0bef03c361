"""Fashion-MNIST, CIFAR-style ResNet-20 (He et al. 2016) with BatchNorm.

Goal (issue 5): >= 93% test accuracy. SGD with Nesterov momentum 0.9, weight
decay 5e-4 (coupled, as in the paper's 1e-4 scaled for the shorter schedule),
batch 128, warm-up then cosine, 10 epochs; the paper's augmentation scaled to
28x28 (2 pixels of zero padding, random 28x28 crop, horizontal flip).
Variants: `fashion_mnist_resnet20.py:epochs=1`, `:depth=32`.
"""

from research import config as config_lib


def get_config(arg=None):
  options = config_lib.parse_arg(arg, epochs=10.0, depth=20)
  config = config_lib.base()
  config.data.name = "fashion_mnist"
  config.data.raw_dir = config_lib.raw_data_dir("fashion_mnist")
  config.data.pp_train = "pad(2)|random_crop(28)|flip_lr"
  config.model = config_lib.entry("model", "resnet_cifar", depth=options.depth)
  config.optimizer = config_lib.entry(
    "optimizer", "momentum", learning_rate=0.1, nesterov=True, weight_decay=5e-4
  )
  config.schedule = config_lib.entry("schedule", "warmup_cosine", warmup_steps=300)
  config.global_batch_size = 128
  config.num_epochs = options.epochs
  config.log_every_steps = 100
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 1000
  return config
