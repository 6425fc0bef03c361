"""MNIST, 784-128-10 ReLU MLP with dropout 0.2, Adam, 5 epochs, batch 32.

Baseline: the TensorFlow/Keras beginner quickstart, ~97.5-98% test accuracy.
"""

from research import config as config_lib


def get_config(arg=None):
  del arg
  config = config_lib.base()
  config.data.name = "mnist"
  config.data.raw_dir = config_lib.raw_data_dir("mnist")
  config.model = config_lib.entry("model", "mlp", widths=(128,), activation="relu", dropout=0.2)
  config.optimizer = config_lib.entry("optimizer", "adam", learning_rate=1e-3)
  config.schedule = config_lib.entry("schedule", "constant")
  config.global_batch_size = 32
  config.num_epochs = 5.0
  config.log_every_steps = 500
  config.checkpoint_every_steps = 2000
  return config
