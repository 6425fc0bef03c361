"""ImageNet (ILSVRC 2012), ResNet-50 with Goyal et al.'s recipe for batch 1024.

Anchor: 76.1% top-1 (torchvision ResNet-50 v1.5 weights, 90 epochs; Goyal et
al. 2017: 76.3% at batch 8k). SGD with Nesterov momentum 0.9, learning rate
0.1 x batch / 256 with 5 epochs of linear warm-up, then cosine; weight decay
1e-4 on weights only; label smoothing 0.1; images resized (shorter side 256),
random 224 crops and flips for training, the central 224 for evaluation. The
ImageNet files are not on this project's machines: TFDS reads them from
`$RESEARCH_RAW_DATA/imagenet2012` (ILSVRC2012_img_{train,val}.tar, its manual
download), and the tests run this config under tfds.testing.mock_data.
Variants: `:depth=18`, `:epochs=1`.
"""

from research import config as config_lib

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def get_config(arg=None):
  options = config_lib.parse_arg(arg, depth=50, epochs=90.0)
  config = config_lib.base()
  config.data.name = "imagenet2012"
  config.data.raw_dir = config_lib.raw_data_dir("imagenet2012")
  config.data.eval_split = "validation"
  config.data.pp_train = f"random_crop(224)|flip_lr|normalize({MEAN}, {STD})"
  config.data.pp_eval = f"central_crop(224)|normalize({MEAN}, {STD})"
  config.model = config_lib.entry("model", "resnet", depth=options.depth)
  config.loss.label_smoothing = 0.1
  config.global_batch_size = 1024
  config.optimizer = config_lib.entry(
    "optimizer", "momentum", learning_rate=0.1 * config.global_batch_size / 256, nesterov=True,
    weight_decay=1e-4,
  )  # fmt: skip
  steps_per_epoch = 1_281_167 // config.global_batch_size
  config.schedule = config_lib.entry("schedule", "warmup_cosine", warmup_steps=5 * steps_per_epoch)
  config.num_epochs = options.epochs
  config.eval_batch_size = 1000
  config.log_every_steps = 100
  config.eval_every_steps = 5 * steps_per_epoch
  config.checkpoint_every_steps = 1000
  return config
