"""Transfer learning: parameter mapping, frozen parameters, BatchNorm per mode, the
backbone's learning-rate scale, and the digits dataset the transfer study uses."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from research import checkpoint, registry, train, transfer
from research import config as config_lib

SHAPES = {
  "params/conv/kernel": (3, 3, 1, 8),
  "params/head/kernel": (8, 10),
  "params/head/bias": (10,),
  "model_state/batch_stats/bn/mean": (8,),
}


def _init(**overrides):
  init = config_lib.base().init
  init.checkpoint = "SOURCE"
  init.update(overrides)
  return init


def _source(**changes):
  source = {name: np.zeros(shape) for name, shape in SHAPES.items()}
  source.update(changes)
  return source


def test_plan_loads_by_name_and_reinitialises_the_head():
  loads, fresh = transfer.plan(SHAPES, _source(), _init())
  same = ("params/conv/kernel", "model_state/batch_stats/bn/mean")
  assert loads == {name: name for name in same}
  assert fresh == ["params/head/kernel", "params/head/bias"]


def test_plan_renames_with_the_first_matching_rule():
  source = _source()
  source["params/backbone/conv/kernel"] = source.pop("params/conv/kernel")
  rules = ("params/(conv/.*)=>params/backbone/\\1", ".*")
  loads, _ = transfer.plan(SHAPES, source, _init(rules=rules))
  assert loads["params/conv/kernel"] == "params/backbone/conv/kernel"


def test_plan_names_every_missing_mismatched_and_unmatched_array():
  source = _source(**{"params/conv/kernel": np.zeros((3, 3, 3, 8))})
  del source["model_state/batch_stats/bn/mean"]
  with pytest.raises(config_lib.ConfigError) as error:
    transfer.plan(SHAPES, source, _init())
  message = str(error.value)
  assert "\n" not in message
  assert "shape mismatch: params/conv/kernel (3, 3, 3, 8) -> params/conv/kernel (3, 3, 1, 8)" in (
    message
  )
  assert "not in the checkpoint: model_state/batch_stats/bn/mean" in message
  with pytest.raises(
    config_lib.ConfigError, match=r"matched by no config.init.rules .*: params/conv/kernel"
  ):
    transfer.plan(SHAPES, _source(), _init(rules=("model_state/.*",)))
  renamed = _init(rules=("params/(.*)=>params/old/\\1", ".*"))
  with pytest.raises(config_lib.ConfigError, match=r"params/conv/kernel \(from params/old/conv"):
    transfer.plan(SHAPES, _source(), renamed)


@pytest.mark.parametrize(
  ("key", "value", "message"),
  [
    ("init.mode", "probe", "config.init.mode='probe': valid: finetune, linear_probe"),
    ("init.reinit", ("head[",), "config.init.reinit: 'head\\[' is not a regex"),
    ("init.backbone_lr_scale", 0.0, "must be > 0"),
    ("evaluators.names", "loss,fewshots", "unknown evaluator 'fewshots' .*did you mean 'fewshot'"),
  ],
)
def test_bad_transfer_and_evaluator_settings_are_one_line_errors(key, value, message):
  config = config_lib.base()
  section, field = key.split(".")
  config[section][field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def _resnet_config(tfds_data_dir, mnist_raw_dir, steps, **init):
  config = config_lib.load_file(f"{config_lib.REPO_ROOT}/experiments/transfer.py:model=resnet20")
  config.data.update(data_dir=tfds_data_dir, raw_dir=mnist_raw_dir, eval_split="test[:200]")
  config.model.update(depth=8, width=4)
  config.global_batch_size, config.eval_batch_size = 32, 200
  config.num_train_steps = config.checkpoint_every_steps = steps
  config.schedule = config_lib.entry("schedule", "constant")
  config.init.update(init)
  return config


@pytest.fixture(scope="module")
def source(tmp_path_factory, mnist, tfds_data_dir, mnist_raw_dir):
  del mnist
  workdir = tmp_path_factory.mktemp("source")
  train.train_and_evaluate(_resnet_config(tfds_data_dir, mnist_raw_dir, 20), str(workdir))
  return workdir, checkpoint.read_state(workdir / "checkpoints")[1]


def _train(config, workdir):
  train.train_and_evaluate(config, str(workdir))
  return checkpoint.read_state(workdir / "checkpoints")[1]


def _groups(state):
  backbone = {k: v for k, v in state.items() if k.startswith("params/") and "/head/" not in k}
  stats = {k: v for k, v in state.items() if k.startswith("model_state/")}
  head = {k: v for k, v in state.items() if k.startswith("params/head/")}
  assert backbone and stats and head
  return backbone, stats, head


def test_linear_probe_trains_only_the_head_and_keeps_batchnorm_statistics(
  source, tfds_data_dir, mnist_raw_dir, tmp_path
):
  source_dir, source_state = source
  config = _resnet_config(tfds_data_dir, mnist_raw_dir, 10, checkpoint=str(source_dir),
                          mode="linear_probe")  # fmt: skip
  probe = _train(config, tmp_path)
  backbone, stats, head = _groups(probe)
  for name, value in {**backbone, **stats}.items():
    np.testing.assert_array_equal(value, source_state[name], err_msg=name)
  assert not any(np.array_equal(v, source_state[k]) for k, v in head.items())
  assert not any(k.startswith("opt_state/") and "conv" in k for k in probe)  # no state if frozen
  saved = ml_collections.ConfigDict(
    __import__("json").loads((tmp_path / "config.json").read_text())
  )  # fmt: skip
  assert saved.derived.init.step == 20 and saved.derived.init.mode == "linear_probe"


def test_finetune_trains_everything_and_updates_batchnorm(source, tfds_data_dir, mnist_raw_dir,
                                                          tmp_path):  # fmt: skip
  source_dir, source_state = source
  config = _resnet_config(tfds_data_dir, mnist_raw_dir, 10, checkpoint=str(source_dir))
  tuned = _train(config, tmp_path)
  backbone, stats, _ = _groups(tuned)
  changed = [not np.array_equal(v, source_state[k]) for k, v in {**backbone, **stats}.items()]
  assert all(changed)


def test_backbone_learning_rate_scale_scales_the_first_update(source, tfds_data_dir,
                                                              mnist_raw_dir, tmp_path):  # fmt: skip
  source_dir, source_state = source
  moves = {}
  for scale in (1.0, 0.1):
    config = _resnet_config(tfds_data_dir, mnist_raw_dir, 1, checkpoint=str(source_dir),
                            backbone_lr_scale=scale)  # fmt: skip
    config.optimizer = config_lib.entry("optimizer", "sgd", learning_rate=0.05)
    state = _train(config, tmp_path / str(scale))
    moves[scale] = {k: v - source_state[k] for k, v in _groups(state)[0].items()}
  for name, move in moves[1.0].items():  # moves are differences of float32 values near 1
    ulp = np.spacing(np.abs(source_state[name]).astype(np.float32))
    np.testing.assert_allclose(moves[0.1][name], 0.1 * move, rtol=1e-4, atol=2 * ulp.max(),
                               err_msg=name)  # fmt: skip
    assert np.abs(move).max() > 20 * ulp.max(), name  # the full-rate move is well resolved


def test_digits_are_real_scikit_learn_digits_in_mnist_framing():
  data = config_lib.base().data
  data.name = "digits"
  dataset = registry.datasets.get("digits")(data)
  assert dataset.train["inputs"].shape == (1000, 28, 28, 1)
  assert dataset.eval["inputs"].shape == (797, 28, 28, 1)
  assert dataset.train["inputs"].dtype == np.uint8
  assert np.bincount(dataset.train["targets"]).min() >= 97  # stratified
  border = np.concatenate([dataset.train["inputs"][:, :4].ravel(),
                           dataset.train["inputs"][:, :, -4:].ravel()])  # fmt: skip
  assert border.max() == 0 and dataset.train["inputs"].max() == 255


def test_study_sections_replace_only_their_own_part(tmp_path):
  from research import transfer_study

  out = tmp_path / "transfer.md"
  transfer_study.write_section(out, "a", "## a\nfirst")
  transfer_study.write_section(out, "b", "## b\nsecond")
  transfer_study.write_section(out, "a", "## a\nagain")
  text = out.read_text()
  assert text.startswith("# Transfer learning")
  assert "again" in text and "first" not in text and "second" in text
  assert text.index("## a") < text.index("## b")
  assert transfer_study.mean_std([0.5, 0.7]) == "60.00 ± 14.14 (n=2)"
