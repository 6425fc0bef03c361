"""MNIST, linear softmax regression, SGD lr 0.5, batch 100, 1000 steps.

Baseline: the classic TensorFlow "MNIST for ML beginners" tutorial, ~92% test accuracy.
"""

from research import config as config_lib


def get_config(arg=None):
  del arg
  config = config_lib.base()
  config.data.name = "mnist"
  config.data.raw_dir = config_lib.raw_data_dir("mnist")
  config.model = config_lib.entry("model", "softmax_regression")
  config.optimizer = config_lib.entry("optimizer", "sgd", learning_rate=0.5)
  config.schedule = config_lib.entry("schedule", "constant")
  config.global_batch_size = 100
  config.num_train_steps = 1000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  return config
