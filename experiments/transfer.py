"""Transfer between handwritten digits and clothing (issue 6): every run of
`results/transfer.md`, sources and targets alike, is this config.

    experiments/transfer.py:data=fashion_mnist,model=cnn,steps=938          # a source
    experiments/transfer.py:data=mnist,model=cnn,steps=150,seed=1 \
        --config.init.checkpoint=runs/transfer/source_fashion_mnist_cnn \
        --config.init.mode=linear_probe                                     # a target

data: mnist, fashion_mnist or digits (scikit-learn's 8x8 digits in MNIST's
framing). model: cnn (the Keras MNIST CNN, Adam 2e-3) or resnet20 (CIFAR-style
ResNet-20, SGD with Nesterov momentum 0.1, weight decay 5e-4). Every run, from
scratch or not, trains `steps` steps of 128 with warm-up and cosine decay and
the same hyperparameters, without augmentation (flips do not suit digits).
"""

from research import config as config_lib

DATA = ("mnist", "fashion_mnist", "digits")  # digits: scikit-learn's, no raw files


def get_config(arg=None):
  options = config_lib.parse_arg(arg, data="mnist", model="cnn", steps=150, seed=0)
  if options.data not in DATA:
    raise config_lib.ConfigError(f"transfer.py: data={options.data!r}; valid: {', '.join(DATA)}")
  config = config_lib.base()
  config.seed = options.seed
  config.data.name = options.data
  config.data.raw_dir = config_lib.raw_data_dir(options.data)
  if options.model == "cnn":
    config.model = config_lib.entry("model", "cnn")
    config.optimizer = config_lib.entry("optimizer", "adam", learning_rate=2e-3)
  elif options.model == "resnet20":
    config.model = config_lib.entry("model", "resnet_cifar", depth=20)
    config.optimizer = config_lib.entry(
      "optimizer", "momentum", learning_rate=0.1, nesterov=True, weight_decay=5e-4
    )
  else:
    raise config_lib.ConfigError(f"transfer.py: model={options.model!r}; valid: cnn, resnet20")
  warmup = min(200, options.steps // 5)
  config.schedule = config_lib.entry("schedule", "warmup_cosine", warmup_steps=warmup)
  config.global_batch_size = 128
  config.num_train_steps = options.steps
  config.log_every_steps = min(100, options.steps)
  config.checkpoint_every_steps = options.steps
  config.max_to_keep = 1
  return config
