"""CIFAR-10 and CIFAR-100, CIFAR-style ResNets as He et al. 2016 (section 4.2) trained them.

Anchors (CIFAR-10 test error): ResNet-20 8.75%, ResNet-56 6.97%. SGD with
momentum 0.9, weight decay 1e-4, batch 128, learning rate 0.1 divided by 10 at
32k and 48k steps, 64k steps (~164 epochs); 4 pixels of zero padding, random
32x32 crop, horizontal flip; per-channel normalisation. CIFAR's files are not on
this project's machines: TFDS downloads them (raw_dir ""), and the tests run
these configs under tfds.testing.mock_data.
Variants: `cifar_resnet.py:dataset=cifar100,depth=56`, `:steps=1000`.
"""

from research import config as config_lib

STATS = {  # per-channel mean and std of the train images, in [0, 1]
  "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
  "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def get_config(arg=None):
  options = config_lib.parse_arg(arg, dataset="cifar10", depth=20, steps=64_000)
  if options.dataset not in STATS:
    raise config_lib.ConfigError(f"dataset={options.dataset!r}: valid: {', '.join(STATS)}")
  config = config_lib.base()
  config.data.name = options.dataset
  config.data.raw_dir = config_lib.raw_data_dir(options.dataset)
  mean, std = STATS[options.dataset]
  config.data.pp_train = f"pad(4)|random_crop(32)|flip_lr|normalize({mean}, {std})"
  config.data.pp_eval = f"normalize({mean}, {std})"
  config.model = config_lib.entry("model", "resnet_cifar", depth=options.depth)
  config.optimizer = config_lib.entry("optimizer", "momentum", learning_rate=0.1, weight_decay=1e-4)
  steps = options.steps
  config.schedule = config_lib.entry(
    "schedule", "piecewise", boundaries=(steps // 2, steps * 3 // 4), scales=(0.1, 0.1)
  )
  config.global_batch_size = 128
  config.num_train_steps = steps
  config.log_every_steps = 200
  config.eval_every_steps = 4000
  config.checkpoint_every_steps = 2000
  return config
