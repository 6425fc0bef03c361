"""MNIST, LeNet-5 (LeCun et al. 1998; tanh, average pooling), momentum SGD.

Anchor: the paper reports 0.95% test error (99.05% accuracy) without distortions.
"""

from research import config as config_lib


def get_config(arg=None):
  options = config_lib.parse_arg(arg, epochs=10.0)
  config = config_lib.base()
  config.data.name = "mnist"
  config.data.raw_dir = config_lib.raw_data_dir("mnist")
  config.model = config_lib.entry("model", "lenet5")
  config.optimizer = config_lib.entry("optimizer", "momentum", learning_rate=0.05, nesterov=True)
  config.schedule = config_lib.entry("schedule", "cosine")
  config.global_batch_size = 128
  config.num_epochs = options.epochs
  config.checkpoint_every_steps = 1000
  return config
