"""Config files, validation and command-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from research import config as config_lib

EXPERIMENTS = sorted(Path(config_lib.REPO_ROOT, "experiments").glob("*.py"))


VARIANTS = [  # file.py:arg variants with settings of their own
  f"{config_lib.REPO_ROOT}/experiments/shakespeare_scaling.py:schedule=wsd,steps={steps}"
  for steps in (250, 2000)
]


@pytest.mark.parametrize("path", EXPERIMENTS + VARIANTS, ids=lambda p: Path(p).name)
def test_every_experiment_loads_and_validates(path):
  config = config_lib.load_file(str(path))
  config_lib.validate(config)


def test_raw_data_dir_finds_each_datasets_folder(monkeypatch):
  """Dataset names (config.data.name) map to the folders of ../shared/data/MANIFEST.tsv."""
  manifest = Path(config_lib.REPO_ROOT.parent, "shared", "data", "MANIFEST.tsv").read_text()
  folders = {line.split("\t")[0] for line in manifest.splitlines()[1:] if line}
  names = ("mnist", "fashion_mnist", "tiny_shakespeare", "multi30k_de_en", "multi30k_en_de")
  assert {Path(config_lib.raw_data_dir(name)).name for name in names} == folders
  assert all(Path(config_lib.raw_data_dir(name)).is_dir() for name in names)
  assert config_lib.raw_data_dir("cifar10") == ""  # not here: TFDS downloads it
  monkeypatch.setenv("RESEARCH_RAW_DATA", "/data")
  assert config_lib.raw_data_dir("fashion_mnist") == "/data/fashion-mnist"
  assert config_lib.raw_data_dir("cifar10") == "/data/cifar10"


def test_arg_selects_a_variant():
  config = config_lib.load_file(f"{config_lib.REPO_ROOT}/experiments/mnist_cnn.py:epochs=1")
  assert config.num_epochs == 1.0
  with pytest.raises(config_lib.ConfigError, match="config arg epoch: unknown key; nearest"):
    config_lib.load_file(f"{config_lib.REPO_ROOT}/experiments/mnist_cnn.py:epoch=1")


def test_entry_fills_defaults_and_rejects_unknown_keys():
  section = config_lib.entry("model", "mlp", widths=(64, 32))
  assert section.widths == (64, 32) and section.activation == "relu" and section.dropout == 0.0
  assert "num_classes" not in section and "dtype" not in section  # derived by the trainer
  optimizer = config_lib.entry("optimizer", "adamw", learning_rate=0.01)
  assert (
    optimizer.learning_rate == 0.01 and optimizer.b2 == 0.999 and optimizer.grad_clip_norm == 0.0
  )
  with pytest.raises(config_lib.ConfigError, match="config arg|model.widht: unknown key"):
    config_lib.entry("model", "mlp", widht=3)


def _valid():
  config = config_lib.base()
  config.model = config_lib.entry("model", "mlp")
  config.optimizer = config_lib.entry("optimizer", "adam", learning_rate=1e-3)
  return config


@pytest.mark.parametrize(
  "mutate, message",
  [
    (lambda c: setattr(c, "lerning_rate", 0.1), "config.lerning_rate: unknown key"),
    (lambda c: c.model.__setattr__("widht", 3), "nearest valid key: config.model.width"),
    (
      lambda c: c.optimizer.__setattr__("learnig_rate", 1.0),
      "nearest valid key: config.optimizer.learning_rate",
    ),
    (lambda c: c.data.__setattr__("raw_dri", "x"), "nearest valid key: config.data.raw_dir"),
    (lambda c: c.model.__setattr__("name", "resnet9000"), "valid: cnn, lenet5, mlp"),
    (lambda c: c.optimizer.__setattr__("name", "adamm"), "did you mean 'adam'"),
    (lambda c: c.schedule.__setattr__("name", "cosin"), "unknown schedule 'cosin'"),
    (lambda c: c.data.__setattr__("name", "cifar11"), "unknown dataset 'cifar11'"),
    (
      lambda c: setattr(c, "model", ml_collections.ConfigDict(dict(name="mlp", widths="wide"))),
      "config.model.widths: wrong type str",
    ),
    (lambda c: c.optimizer.__setattr__("learning_rate", -0.1), "learning_rate=-0.1: must be > 0"),
    (lambda c: c.model.__setattr__("dropout", 1.5), "config.model.dropout=1.5: must be in"),
    (lambda c: setattr(c, "eval_batch_size", 0), "config.eval_batch_size=0: must be > 0"),
    (lambda c: setattr(c, "dtype", "float16"), "valid: float32, bfloat16"),
  ],
)
def test_validate_names_the_bad_key(mutate, message):
  config = _valid()
  config_lib.validate(config)
  mutate(config)
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace("'", ".")):
    config_lib.validate(config)


def _train_cli(tmp_path, *args):
  workdir = tmp_path / "workdir"
  result = subprocess.run(
    [sys.executable, "-m", "research.train", f"--workdir={workdir}", *args],
    capture_output=True,
    text=True,
    cwd=config_lib.REPO_ROOT,
    timeout=300,
  )
  return result, workdir


@pytest.mark.parametrize(
  "args, message",
  [
    (
      ["--config=experiments/mnist_softmax.py", "--config.optimizer.learnin_rate=0.1"],
      "config.optimizer.learnin_rate: unknown key; "
      "nearest valid key: config.optimizer.learning_rate",
    ),
    (
      ["--config=experiments/mnist_softmax.py", "--config.global_batch_size=abc"],
      "config.global_batch_size: wrong type for value 'abc': expected int",
    ),
    (
      ["--config=experiments/mnist_softmax.py", "--config.model.name=resnet9000"],
      "config.model.name: unknown model 'resnet9000'",
    ),
    (
      ["--config=experiments/mnist_softmax.py", "--config.optimizer.learning_rate=-1"],
      "config.optimizer.learning_rate=-1.0: must be > 0",
    ),
    (["--config=experiments/nope.py"], "config file 'experiments/nope.py' not found; available:"),
    (
      ["--config=experiments/mnist_softmax.py", "--config.grad_accum_steps=3"],
      "config.grad_accum_steps=3: global_batch_size 100 must split into that many microbatches",
    ),
    (
      ["--config=experiments/mnist_softmax.py", "--wrokdir=x"],
      "Unknown command line flag 'wrokdir'",
    ),
    (
      [
        "--config=experiments/mnist_softmax.py",
        "--config.optimizer.name=adam",
        "--config.optimizer.nesterov=True",
      ],
      "config.optimizer.nesterov: unknown key; nearest valid key:",
    ),
    (
      [
        "--config=experiments/mnist_softmax.py",
        "--config.optimizer.name=momentum",
        "--config.optimizer.nesterov=maybe",
      ],
      "config.optimizer.nesterov: wrong type for value 'maybe': expected bool",
    ),
    (
      ["--config=experiments/mnist_softmax.py", "--config.schedule.name=cosinus"],
      "config.schedule.name: unknown schedule 'cosinus'",
    ),
  ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
  result, workdir = _train_cli(tmp_path, *args)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert message in lines[-1], lines[-5:]
  assert "Traceback" not in result.stderr
  assert not workdir.exists()  # nothing written for bad input


def test_cli_bad_model_setting_is_one_line(tmp_path, mnist, tfds_data_dir, mnist_raw_dir):
  """A value the model itself refuses when built (here a ViT patch that does not divide
  MNIST's 28 x 28) is a config error: one line naming the key, exit 2, no workdir."""
  del mnist  # prepared by the session fixture
  result, workdir = _train_cli(
    tmp_path, "--config=experiments/fashion_mnist_vit.py", "--config.data.name=mnist",
    f"--config.data.data_dir={tfds_data_dir}", f"--config.data.raw_dir={mnist_raw_dir}",
    "--config.model.patch_size=5",
  )  # fmt: skip
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last == "error: config.model.patch_size=5 does not divide the image size 28x28"
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


def test_cli_continuing_another_models_checkpoint_is_one_line(
  tmp_path, mnist, tfds_data_dir, mnist_raw_dir
):
  """config.init.mode=continue from a checkpoint of another shape: one line naming the
  checkpoint and the first array that does not fit, exit 2, none of Orbax's tracebacks."""
  del mnist  # prepared by the session fixture
  data = [f"--config.data.data_dir={tfds_data_dir}", f"--config.data.raw_dir={mnist_raw_dir}"]
  source = tmp_path / "source"
  made = subprocess.run(
    [sys.executable, "-m", "research.train", "--config=experiments/mnist_mlp.py",
     f"--workdir={source}", "--config.num_train_steps=2", *data],
    capture_output=True, text=True, cwd=config_lib.REPO_ROOT, timeout=300,
  )  # fmt: skip
  assert made.returncode == 0, made.stderr[-2000:]
  result, workdir = _train_cli(
    tmp_path, "--config=experiments/mnist_mlp.py", "--config.num_train_steps=4", *data,
    f"--config.init.checkpoint={source}", "--config.init.mode=continue",
    "--config.model.widths=(64,)",
  )  # fmt: skip
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if not line.startswith(("I", "W"))]
  assert len(errors) == 1, errors  # the array named is whichever read failed first
  assert re.fullmatch(
    rf"error: config.init.checkpoint='{re.escape(str(source))}': its train state does not fit "
    r"this config's \(Requested shape: \(\d+, \d+\) is not compatible with the stored shape: "
    r"\(\d+, \d+\)\); "
    r"config.init.mode='continue' needs the same model and optimizer",
    errors[0],
  ), errors


SWITCH_AND_PRINT = """
import json, sys
from absl import flags
from research import cli, train
cli.parse_flags(sys.argv)
print(json.dumps(flags.FLAGS.config.optimizer.to_dict()))
"""


def test_command_line_switches_an_entry_keeping_shared_keys_and_taking_the_new_ones():
  """--config.optimizer.name=adam on LeNet-5's momentum config: the section is Adam's,
  with the shared keys kept (weight_decay) or overridden (learning_rate, given before the
  switch), momentum's own keys (momentum, nesterov) dropped with a warning naming them,
  and Adam's own keys overridable (b1)."""
  result = subprocess.run(
    [sys.executable, "-c", SWITCH_AND_PRINT, "--config=experiments/mnist_lenet5.py",
     "--config.optimizer.learning_rate=0.02", "--config.optimizer.name=adam",
     "--config.optimizer.b1=0.8"],
    capture_output=True, text=True, cwd=config_lib.REPO_ROOT, timeout=120,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  saved = config_lib.load_file("experiments/mnist_lenet5.py").optimizer
  assert saved.name == "momentum" and "b1" not in saved  # the file's own entry
  optimizer = json.loads(result.stdout.strip().splitlines()[-1])
  assert optimizer == {
    **config_lib.entry("optimizer", "adam").to_dict(),
    "learning_rate": 0.02, "weight_decay": saved.weight_decay, "b1": 0.8,
  }  # fmt: skip
  assert "momentum's keys that adam does not take are dropped: momentum, nesterov" in (
    result.stderr
  )


def switched(config, kind, name):
  dropped = config_lib.switch_entry(config, kind, name)
  return config[kind].to_dict(), dropped


def test_switch_entry_keeps_what_both_entries_take():
  config = config_lib.load_file("experiments/shakespeare_char.py")
  section, dropped = switched(config, "optimizer", "lion")
  assert dropped == ["eps"]
  assert section == {**config_lib.entry("optimizer", "lion").to_dict(), "learning_rate": 3e-3,
                     "b2": 0.99, "weight_decay": 0.1, "grad_clip_norm": 1.0}  # fmt: skip
  with pytest.raises(config_lib.ConfigError, match="config.model.name: unknown model 'gpt5'"):
    config_lib.switch_entry(config, "model", "gpt5")


def test_cli_missing_data_is_one_line_and_leaves_no_workdir(tmp_path):
  empty = tmp_path / "empty_raw"
  empty.mkdir()
  result, workdir = _train_cli(
    tmp_path,
    "--config=experiments/mnist_softmax.py",
    f"--config.data.raw_dir={empty}",
    f"--config.data.data_dir={tmp_path / 'tfds'}",
  )
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: missing raw file") and "expected sha256" in last
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


def test_cli_unwritable_workdir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  result = subprocess.run(
    [
      sys.executable, "-m", "research.train", "--config=experiments/mnist_softmax.py",
      f"--workdir={blocker / 'run'}",
    ],
    capture_output=True, text=True, cwd=config_lib.REPO_ROOT, timeout=300,
  )  # fmt: skip
  assert result.returncode == 2
  assert "not writable" in result.stderr.strip().splitlines()[-1]
