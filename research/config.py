"""Config helpers: the base config, loading experiment files, validation, derived values.

An experiment file `experiments/NAME.py` defines `get_config(arg=None)` that
starts from `base()` and sets what the experiment needs. `validate` checks the
result before any compute: an unknown key, a wrong type or an invalid value
raises `ConfigError` with one line naming the key and the nearest valid key.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import json
import os
import re
from pathlib import Path

import ml_collections

from research import registry

REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPES = ("float32", "bfloat16")
NAN_POLICIES = ("halt", "skip")
MESH_AXES = ("data", "fsdp", "model")
# Model arguments the trainer fills in itself (from the dataset and config.dtype).
DERIVED_MODEL_KEYS = ("num_classes", "vocab_size", "dtype")  # set from the data and config


class ConfigError(ValueError):
  """Bad config: the message is one line naming the key and what is valid."""


def base() -> ml_collections.ConfigDict:
  """Every key a run reads, with defaults. Experiments change what they need."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = ml_collections.ConfigDict(
    dict(
      name="mnist",
      raw_dir="",  # original files; "" downloads through TFDS when online
      data_dir="",  # TFDS data_dir; "" uses $TFDS_DATA_DIR or ~/tensorflow_datasets
      train_split="train",
      eval_split="test",
      seq_len=0,  # text datasets: tokens per training example (image datasets: unused, 0)
      # Image preprocessing, ops joined by "|" (research/data/preprocess.py), e.g.
      # "pad(4)|random_crop(32)|flip_lr"; random ops only in pp_train.
      pp_train="",
      pp_eval="",
      vocab_size=0,  # datasets that train a subword tokenizer (translation): its size
      # In-memory training sets up to this many MB, whose pp_train is empty or of ops
      # with a device form (pad, central_crop, random_crop, flip_lr), are held whole on
      # every device, and the jitted step gathers its batch and applies pp_train there
      # (parallel.BatchFeeder); 0: every step's rows are sent from the host.
      device_resident_mb=256,
    )
  )
  config.model = ml_collections.ConfigDict(dict(name="softmax_regression"))
  config.loss = ml_collections.ConfigDict(dict(name="softmax_xent", label_smoothing=0.0))
  config.optimizer = ml_collections.ConfigDict(
    dict(
      name="sgd",
      learning_rate=0.1,
      weight_decay=0.0,
      grad_clip_norm=0.0,  # 0 disables global-norm clipping
      l1_penalty=0.0,
      l2_penalty=0.0,
      ema_decay=0.0,  # > 0: evaluate a moving average of the parameters (e.g. 0.999)
    )
  )
  config.schedule = ml_collections.ConfigDict(dict(name="constant"))
  # Sequence generation in evaluation (translation: BLEU of beam search on eval_split).
  config.decode = ml_collections.ConfigDict(
    dict(beam_size=4, length_penalty=0.6, max_new_tokens=0)  # 0: source length + 50, as fairseq
  )
  # Evaluators run every eval_every_steps and at the end, and by research.evaluate
  # on any checkpoint (research/evaluators).
  config.evaluators = ml_collections.ConfigDict(
    dict(
      names="",  # comma-separated, e.g. "loss,classification,fewshot"; "": loss (+ bleu)
      top_k=5,  # classification: top-k accuracy besides top-1
      fewshot_shots=(1, 5, 10, 25),  # fewshot: examples per class of the train split
      fewshot_seeds=3,  # fewshot: draws of those examples, averaged
      fewshot_l2_reg=1024.0,  # fewshot: ridge regularisation (big_vision's 2**10)
    )
  )
  # Transfer learning (research/transfer.py): start from another run's checkpoint.
  config.init = ml_collections.ConfigDict(
    dict(
      checkpoint="",  # a run's workdir, its checkpoints/ or checkpoints/STEP; "": from scratch
      rules=(".*",),  # regexes of arrays to load; "TARGET=>SOURCE" loads a renamed array
      reinit=("params/head/.*",),  # arrays initialised fresh instead (a new head)
      mode="finetune",  # "finetune" or "linear_probe" (loaded parameters frozen)
      backbone_lr_scale=1.0,  # finetune: update multiplier of the loaded parameters
    )
  )
  config.global_batch_size = 128
  # 256: on the CPU the MNIST CNN's evaluation at 1,000 per batch needed a temporary
  # buffer beyond the 1 GB that runtime.tune_malloc keeps on the heap, so it was mapped
  # and page-faulted afresh every batch (3.2M faults per evaluation against 41k at 256;
  # 6.2-7.8 s against 2.8-3.5 s; ResNet-20 and ViT 8-10% faster too).
  config.eval_batch_size = 256
  config.grad_accum_steps = 1  # microbatches per step: gradients accumulated, one update
  # Train steps per jitted call (a lax.scan; Keras's steps_per_execution): amortises the
  # Python dispatch of small steps. Needs the training data held on the device.
  config.steps_per_dispatch = 1
  config.num_epochs = 1.0
  config.num_train_steps = -1  # > 0 overrides num_epochs
  config.dtype = "float32"  # compute dtype; parameters, optimizer state and loss stay float32
  config.nan_policy = "halt"  # NaN/Inf loss or gradient: "halt" the run, or "skip" the update
  config.log_every_steps = 100
  config.eval_every_steps = -1  # -1: evaluate only at the end
  config.checkpoint_every_steps = 1000
  config.max_to_keep = 3
  # > 0: checkpoints at multiples of it are kept for good besides the latest max_to_keep
  # (big_vision's keep_ckpt_steps; e.g. points of a WSD run's stable phase to decay from).
  config.keep_every_steps = 0
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  # JAX's profiler over train steps start_step.. (as the log numbers them; step 1
  # compiles) into WORKDIR/tensorboard (research/profiling.py); 0: no profile.
  config.profile = ml_collections.ConfigDict(dict(start_step=0, num_steps=3))
  # Logical axis name -> mesh axes; () replicates. Models name their parameter axes.
  config.sharding_rules = ml_collections.ConfigDict(
    dict(
      batch=("data", "fsdp"),
      embed=("fsdp",),
      mlp=("model",),
      heads=("model",),
      kv=(),
      vocab=("model",),
      classes=(),
      conv_in=(),
      # Not over `model`: splitting channels reorders the sums inside every
      # convolution and near-ties in max-pooling then flip (measured: a
      # tensor-parallel CNN drifted to 6e-4 relative loss by step 49, against
      # <= 3e-7 for data parallel and FSDP). Tensor parallelism splits the dense layers.
      conv_out=("fsdp",),
    )
  )
  return config


def entry(kind: str, name: str, **overrides) -> ml_collections.ConfigDict:
  """A config section for registry entry `name` with every argument at its default.

  Filling the defaults in makes every argument overridable from the command
  line and recorded in config.json.
  """
  section = {"name": name}
  if kind == "optimizer":  # the keys every optimizer shares, then its own
    section.update({k: v for k, v in base().optimizer.items() if k != "name"})
  for key, param in _section_parameters(kind, name).items():
    if param.default is not inspect.Parameter.empty:
      section[key] = param.default
  for key, value in overrides.items():
    if key not in section and key != "name":
      raise ConfigError(_unknown_key_message(f"{kind}.{key}", section))
    section[key] = value
  return ml_collections.ConfigDict(section)


# Datasets whose original files sit in a folder not named after the dataset (the
# folder names of ../shared/data/MANIFEST.tsv); any other dataset's folder is its name.
RAW_FOLDERS = {
  "fashion_mnist": "fashion-mnist",
  "tiny_shakespeare": "tinyshakespeare",
  "multi30k_de_en": "multi30k",
  "multi30k_en_de": "multi30k",
}


def raw_data_dir(dataset: str) -> str:
  """Where the original files of a dataset (its config.data.name) are:
  $RESEARCH_RAW_DATA/folder, else ../shared/data/folder beside the repository, else ""
  (download online); the folder is RAW_FOLDERS' entry, else the dataset's name."""
  folder = RAW_FOLDERS.get(dataset, dataset)
  root = os.environ.get("RESEARCH_RAW_DATA")
  if root:
    return str(Path(root) / folder)
  local = REPO_ROOT.parent / "shared" / "data" / folder
  return str(local) if local.is_dir() else ""


def load_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` the way config_flags does."""
  path, _, arg = spec.partition(":")
  if not Path(path).is_file():
    available = sorted(
      str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "experiments").glob("*.py")
    )
    raise ConfigError(f"config file {path!r} not found; available: {', '.join(available)}")
  module = load_module(path)
  return module.get_config(arg) if arg else module.get_config()


def load_module(path: str):
  """The experiment file at `path` as a module (get_config, and get_sweep if it has one)."""
  module_spec = importlib.util.spec_from_file_location("_experiment_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


# --- Validation.


def _section_parameters(kind: str, name: str) -> dict[str, inspect.Parameter]:
  if kind == "model":
    params = registry.models.parameters(name)
    return {k: v for k, v in params.items() if k not in DERIVED_MODEL_KEYS}
  if kind == "optimizer":
    return {k: v for k, v in registry.optimizers.parameters(name).items() if k != "schedule"}
  if kind == "schedule":
    params = registry.schedules.parameters(name)
    return {k: v for k, v in params.items() if k not in ("learning_rate", "total_steps")}
  if kind == "loss":
    return registry.losses.parameters(name)
  raise KeyError(kind)


_REGISTRIES = {
  "model": registry.models,
  "optimizer": registry.optimizers,
  "schedule": registry.schedules,
  "loss": registry.losses,
}
ENTRY_SECTIONS = tuple(_REGISTRIES)  # config sections that name a registry entry


def _flat_keys(config, prefix="config") -> list[str]:
  keys = []
  for key, value in config.items():
    path = f"{prefix}.{key}"
    keys.append(path)
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(_flat_keys(value, path))
  return keys


def _unknown_key_message(path: str, valid) -> str:
  """'config.a.b: unknown key; nearest valid key: config.a.c' for a missing path."""
  parent, _, key = path.rpartition(".")
  close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.0)
  nearest = f"; nearest valid key: {parent}.{close[0]}" if close else ""
  return f"{path}: unknown key{nearest} (valid at {parent}: {', '.join(sorted(valid))})"


def unknown_path_message(config, dotted: str) -> str | None:
  """If `config.<dotted>` does not exist, the one-line error for it, else None."""
  node, walked = config, "config"
  for key in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      return f"{walked}.{key}: unknown key; {walked} is a {type(node).__name__}, not a section"
    if key not in node:
      return _unknown_key_message(f"{walked}.{key}", node.keys())
    node, walked = node[key], f"{walked}.{key}"
  return None


def _type_ok(value, default) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  if isinstance(default, str):
    return isinstance(value, str)
  return True  # None or other defaults: no type to hold it to


def _check_section(config, kind: str, fixed_keys: tuple[str, ...] = ()):
  section = config[kind]
  if not isinstance(section, ml_collections.ConfigDict) or "name" not in section:
    raise ConfigError(f"config.{kind}: must be a section with a 'name'")
  try:
    params = _section_parameters(kind, section.name)
  except registry.UnknownNameError as e:
    raise ConfigError(f"config.{kind}.name: {e}") from None
  valid = {"name": None, **{k: None for k in fixed_keys}, **params}
  for key, value in section.items():
    if key not in valid:
      raise ConfigError(_unknown_key_message(f"config.{kind}.{key}", valid))
    param = params.get(key)
    if param is not None and param.default is not inspect.Parameter.empty:
      if not _type_ok(value, param.default):
        raise ConfigError(
          f"config.{kind}.{key}: wrong type {type(value).__name__} ({value!r}); "
          f"expected {type(param.default).__name__} like {param.default!r}"
        )
    if ("dropout" in key or key == "stochastic_depth") and not 0.0 <= value < 1.0:
      raise ConfigError(f"config.{kind}.{key}={value}: must be in [0, 1)")


def _require(condition: bool, message: str):
  if not condition:
    raise ConfigError(message)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (one line) for an unknown key, a wrong type or a bad value."""
  reference = base()
  for key in config.keys():
    if key not in reference:
      raise ConfigError(_unknown_key_message(f"config.{key}", reference.keys()))
  for key in reference.keys():
    if key not in config:
      raise ConfigError(
        f"config.{key}: missing; start experiment configs from research.config.base()"
      )
  for path in _flat_keys(reference):
    dotted = path.removeprefix("config.")
    section = dotted.split(".")[0]
    if section in _REGISTRIES:
      continue
    message = unknown_path_message(config, dotted)
    if message:
      raise ConfigError(
        f"config.{dotted}: missing; start experiment configs from research.config.base()"
      )
  for key, value in config.items():
    if key in _REGISTRIES or key == "sharding_rules":
      continue
    if isinstance(value, ml_collections.ConfigDict):
      for sub, sub_value in value.items():
        if sub not in reference[key]:
          raise ConfigError(_unknown_key_message(f"config.{key}.{sub}", reference[key].keys()))
        if not _type_ok(sub_value, reference[key][sub]):
          raise ConfigError(
            f"config.{key}.{sub}: wrong type {type(sub_value).__name__} ({sub_value!r}); "
            f"expected {type(reference[key][sub]).__name__}"
          )
    elif not _type_ok(value, reference[key]):
      raise ConfigError(
        f"config.{key}: wrong type {type(value).__name__} ({value!r}); "
        f"expected {type(reference[key]).__name__}"
      )

  from research import optim

  _check_section(config, "model")
  _check_section(config, "loss")
  _check_section(config, "schedule")
  _check_section(config, "optimizer", fixed_keys=optim.COMMON_KEYS)
  try:
    registry.datasets.get(config.data.name)
  except registry.UnknownNameError as e:
    raise ConfigError(f"config.data.name: {e}") from None

  _check_preprocessing(config.data)
  _check_evaluators(config.evaluators)
  _check_init(config.init)

  opt = config.optimizer
  _require(
    opt.learning_rate > 0, f"config.optimizer.learning_rate={opt.learning_rate}: must be > 0"
  )
  for key in ("weight_decay", "grad_clip_norm", "l1_penalty", "l2_penalty"):
    _require(opt[key] >= 0, f"config.optimizer.{key}={opt[key]}: must be >= 0")
  _require(
    0.0 <= opt.ema_decay < 1.0, f"config.optimizer.ema_decay={opt.ema_decay}: must be in [0, 1)"
  )
  _require(
    config.global_batch_size > 0,
    f"config.global_batch_size={config.global_batch_size}: must be > 0",
  )
  _require(
    config.eval_batch_size > 0, f"config.eval_batch_size={config.eval_batch_size}: must be > 0"
  )
  _require(
    config.num_train_steps > 0 or config.num_epochs > 0,
    "config.num_epochs and config.num_train_steps: one of them must be > 0",
  )
  _require(
    config.nan_policy in NAN_POLICIES,
    f"config.nan_policy={config.nan_policy!r}: valid: {', '.join(NAN_POLICIES)}",
  )
  _require(config.dtype in DTYPES, f"config.dtype={config.dtype!r}: valid: {', '.join(DTYPES)}")
  for key in (
    "log_every_steps", "checkpoint_every_steps", "max_to_keep", "grad_accum_steps",
    "steps_per_dispatch",
  ):  # fmt: skip
    _require(config[key] > 0, f"config.{key}={config[key]}: must be > 0")
  _require(
    config.eval_every_steps > 0 or config.eval_every_steps == -1,
    f"config.eval_every_steps={config.eval_every_steps}: must be > 0, or -1 for the end only",
  )
  _require(
    config.keep_every_steps >= 0 and config.keep_every_steps % config.checkpoint_every_steps == 0,
    f"config.keep_every_steps={config.keep_every_steps}: must be 0 (none kept) or a multiple "
    f"of config.checkpoint_every_steps={config.checkpoint_every_steps}",
  )
  profile = config.profile
  _require(
    profile.start_step >= 0,
    f"config.profile.start_step={profile.start_step}: must be >= 1, or 0 for no profile",
  )
  _require(profile.num_steps > 0, f"config.profile.num_steps={profile.num_steps}: must be > 0")
  for logical, axes in config.sharding_rules.items():
    _require(
      isinstance(axes, (tuple, list)) and all(a in MESH_AXES for a in axes),
      f"config.sharding_rules.{logical}={axes!r}: must be a tuple of mesh axes from "
      f"{', '.join(MESH_AXES)}",
    )
  _require("batch" in config.sharding_rules, "config.sharding_rules.batch: missing")
  for axis in MESH_AXES:
    size = config.mesh[axis]
    _require(size > 0 or size == -1, f"config.mesh.{axis}={size}: must be > 0, or -1 to fill")


def evaluator_names(evaluators_config) -> list[str]:
  return [n.strip() for n in evaluators_config.names.split(",") if n.strip()]


def _check_evaluators(evaluators) -> None:
  for name in evaluator_names(evaluators):
    try:
      registry.evaluators.get(name)
    except registry.UnknownNameError as e:
      raise ConfigError(f"config.evaluators.names={evaluators.names!r}: {e}") from None
  _require(evaluators.top_k > 1, f"config.evaluators.top_k={evaluators.top_k}: must be > 1")
  _require(
    len(evaluators.fewshot_shots) > 0 and all(k > 0 for k in evaluators.fewshot_shots),
    f"config.evaluators.fewshot_shots={evaluators.fewshot_shots!r}: must be positive counts",
  )
  _require(
    evaluators.fewshot_seeds > 0,
    f"config.evaluators.fewshot_seeds={evaluators.fewshot_seeds}: must be > 0",
  )
  _require(
    evaluators.fewshot_l2_reg >= 0,
    f"config.evaluators.fewshot_l2_reg={evaluators.fewshot_l2_reg}: must be >= 0",
  )


def _check_init(init) -> None:
  from research import transfer

  _require(
    init.mode in transfer.MODES,
    f"config.init.mode={init.mode!r}: valid: {', '.join(transfer.MODES)}",
  )
  _require(
    init.backbone_lr_scale > 0,
    f"config.init.backbone_lr_scale={init.backbone_lr_scale}: must be > 0",
  )
  for key in ("rules", "reinit"):
    for rule in init[key]:
      pattern = rule.partition("=>")[0] if key == "rules" else rule
      try:
        re.compile(pattern)
      except (re.error, TypeError) as e:
        raise ConfigError(f"config.init.{key}: {rule!r} is not a regex ({e})") from None


def _check_preprocessing(data) -> None:
  from research.data import preprocess

  for key in ("pp_train", "pp_eval"):
    try:
      pipeline = preprocess.Pipeline(data[key])
    except (ValueError, registry.UnknownNameError) as e:
      raise ConfigError(f"config.data.{key}={data[key]!r}: {e}") from None
    _require(
      key == "pp_train" or not pipeline.random,
      f"config.data.pp_eval={data.pp_eval!r}: random ops belong in pp_train only "
      "(evaluation must see the same examples every time)",
    )


# --- Derived values and the saved config.


def to_json(config, **extra) -> str:
  return json.dumps({"config": config.to_dict(), **extra}, indent=2, sort_keys=True, default=str)


def diff(saved: dict, current: dict, ignore=(), prefix: str = "") -> list[str]:
  """'key: old -> new' for every leaf that differs between two config dicts."""
  differ = []
  for key in sorted(set(saved) | set(current)):
    path = f"{prefix}{key}"
    if path in ignore:
      continue
    old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
    if isinstance(old, dict) and isinstance(new, dict):
      differ.extend(diff(old, new, ignore, f"{path}."))
    elif old != new:
      differ.append(f"{path}: {old!r} -> {new!r}")
  return differ


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`file.py:a=1,b=x` -> ConfigDict(a=1, b='x'), typed by `defaults`; unknown names are errors."""
  options = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in options:
      raise ConfigError(_unknown_key_message(f"config arg {key}", options.keys()))
    default = options[key]
    if isinstance(default, bool):
      options[key] = value.lower() in ("", "1", "true", "yes")
    else:
      options[key] = type(default)(value)
  return options


def config_hash(config) -> str:
  """12 hex digits of the sha256 of the config's canonical JSON: equal configs, equal hashes."""
  import hashlib

  return hashlib.sha256(to_json(config).encode()).hexdigest()[:12]


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A run's saved config (config.json) on top of today's base(): sections added
  since the run was made take their defaults."""
  config = base()
  for key, value in saved.items():
    if isinstance(value, dict) and key in config and key not in _REGISTRIES:
      for sub, sub_value in value.items():
        config[key][sub] = tuple(sub_value) if isinstance(sub_value, list) else sub_value
    elif isinstance(value, dict):
      config[key] = ml_collections.ConfigDict(value)
    else:
      config[key] = value
  return config


def switch_entry(config, kind: str, name: str) -> list[str]:
  """Re-makes config.<kind> (model, optimizer, schedule, loss) for registry entry
  `name`: every argument at the new entry's default, then the old section's value of
  each key the new entry also takes (learning_rate, weight_decay, dropout, ...).
  Returns the keys dropped: the old entry's own, which the new one does not take."""
  old = config[kind]
  try:
    new = entry(kind, name)
  except registry.UnknownNameError as e:
    raise ConfigError(f"config.{kind}.name: {e}") from None
  dropped = sorted(key for key in old if key not in new)
  for key in old:
    if key in new and key != "name":
      try:
        new[key] = old[key]
      except TypeError:  # another type in the new entry: its default stays
        dropped.append(key)
  config[kind] = new
  return dropped
