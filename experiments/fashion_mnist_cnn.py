"""Fashion-MNIST, the same Keras-example CNN as mnist_cnn.

Anchor: Fashion-MNIST's benchmark lists 2-layer CNNs at 91-93% test accuracy.
"""

from research import config as config_lib


def get_config(arg=None):
  options = config_lib.parse_arg(arg, epochs=5.0)
  config = config_lib.base()
  config.data.name = "fashion_mnist"
  config.data.raw_dir = config_lib.raw_data_dir("fashion_mnist")
  config.model = config_lib.entry("model", "cnn")
  config.optimizer = config_lib.entry("optimizer", "adam", learning_rate=2e-3)
  config.schedule = config_lib.entry("schedule", "warmup_cosine", warmup_steps=200)
  config.global_batch_size = 128
  config.num_epochs = options.epochs
  config.checkpoint_every_steps = 500
  return config
