"""Logical axis rules: errors that name the parameter, and DP / FSDP / TP equal to one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
from helpers.xla import devices_flags
from jax.sharding import PartitionSpec

from research import config as config_lib
from research import runtime, sharding

RULES = {k: tuple(v) for k, v in config_lib.base().sharding_rules.items()}
MESH_2x2x2 = types.SimpleNamespace(shape={"data": 2, "fsdp": 2, "model": 2})  # only .shape is read


def test_rules_map_logical_axes_to_mesh_axes():
  spec = sharding.mesh_spec("params/fc1/kernel", (64, 32), ("embed", "mlp"), RULES, MESH_2x2x2)
  assert spec == PartitionSpec("fsdp", "model")
  conv = sharding.mesh_spec(
    "params/conv1/kernel", (3, 3, 1, 32), (None, None, "conv_in", "conv_out"), RULES, MESH_2x2x2
  )
  assert conv == PartitionSpec(None, None, None, "fsdp")
  both = sharding.mesh_spec("params/x", (8,), ("batch",), RULES, MESH_2x2x2)
  assert both == PartitionSpec(("data", "fsdp"))


def test_unknown_logical_name_names_the_parameter():
  with pytest.raises(
    config_lib.ConfigError, match="params/x/kernel: logical axis 'expert' has no rule"
  ):
    sharding.mesh_spec("params/x/kernel", (8, 8), ("expert", "mlp"), RULES, MESH_2x2x2)


def test_indivisible_dimension_names_the_parameter():
  with pytest.raises(
    config_lib.ConfigError,
    match=r"params/head/kernel: dimension 0 \('embed', size 7\) is not divisible by 2",
  ):
    sharding.mesh_spec("params/head/kernel", (7, 10), ("embed", "classes"), RULES, MESH_2x2x2)


def test_conflicting_rules_name_the_parameter():
  rules = dict(RULES, embed=("model",))
  with pytest.raises(
    config_lib.ConfigError, match="params/fc/kernel: conflicting rules: mesh axis 'model'"
  ):
    sharding.mesh_spec("params/fc/kernel", (8, 8), ("embed", "mlp"), rules, MESH_2x2x2)


def test_rules_with_unknown_mesh_axes_fail_validation():
  config = config_lib.base()
  config.sharding_rules.mlp = ("tensor",)
  with pytest.raises(
    config_lib.ConfigError, match="config.sharding_rules.mlp=.*must be a tuple of mesh axes"
  ):
    config_lib.validate(config)


def test_activations_are_constrained_by_the_rules():
  """Layer outputs carry sharding constraints from the rules; batch claims its axes first."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import linen as nn
  from jax.sharding import Mesh

  from research import registry

  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), config_lib.MESH_AXES)
  model = registry.models.get("cnn")(conv_features=(4, 8), dense_features=16)
  images = jnp.zeros((2, 28, 28, 1))
  params = nn.meta.unbox(model.init(jax.random.key(0), images))

  def apply(params, images):
    with sharding.activation_context(mesh, RULES):
      return model.apply(params, images)

  text = jax.jit(apply).lower(params, images).as_text()
  constraints = [
    line.split("<@mesh, ")[1] for line in text.splitlines() if "sharding_constraint" in line
  ]
  # conv1, conv2: (batch, -, -, conv_out) where conv_out's `fsdp` is taken by batch;
  # fc1: (batch, mlp); head: (batch, classes).
  assert constraints == [
    '[{"data", "fsdp"}, {}, {}, {}]> : tensor<2x26x26x4xf32>',
    '[{"data", "fsdp"}, {}, {}, {}]> : tensor<2x24x24x8xf32>',
    '[{"data", "fsdp"}, {"model"}]> : tensor<2x16xf32>',
    '[{"data", "fsdp"}, {}]> : tensor<2x10xf32>',
  ]
  assert "sharding_constraint" not in jax.jit(model.apply).lower(params, images).as_text()


def test_fsdp_shards_the_optimizer_state_with_its_parameters():
  import functools

  import jax
  import numpy as np
  import optax

  from research import parallel, registry
  from research import step as step_lib

  model = registry.models.get("mlp")(widths=(128,), num_classes=10)
  init = functools.partial(
    step_lib.init_state, model, optax.adam(1e-3), jax.random.key(0),
    np.zeros((1, 28, 28, 1), np.uint8), boxed=True,
  )  # fmt: skip
  mesh = parallel.make_mesh(config_lib.base().mesh)  # every device on `data`
  _, _, rows = sharding.state_shardings(jax.eval_shape(init), mesh, RULES)
  by_name = {r["name"]: r for r in rows}
  # The Adam moments carry their parameter's logical axes, hence its mesh sharding.
  for moment in ("mu", "nu"):
    row = by_name[f"opt_state/0/{moment}/hidden_0/kernel"]
    assert row["logical"] == ("embed", "mlp") and row["mesh"] == ("fsdp", "model")


def test_adafactors_factored_moments_are_replicated_its_full_ones_sharded():
  """Adafactor keeps a matrix's second moment as a row and a column vector, which carry
  the matrix's two logical axes: they are replicated (without that, the sharding failed
  on the rank). A matrix with a dimension under min_dim_size_to_factor keeps a full
  moment, sharded as its parameter."""
  import functools

  import jax
  import numpy as np

  from research import optim, parallel, registry
  from research import step as step_lib

  tx, _ = optim.make_optimizer(
    config_lib.entry("optimizer", "adafactor", learning_rate=1e-3),
    config_lib.entry("schedule", "constant"),
    total_steps=10,
  )
  model = registry.models.get("mlp")(widths=(128,), num_classes=10)
  init = functools.partial(
    step_lib.init_state, model, tx, jax.random.key(0), np.zeros((1, 28, 28, 1), np.uint8),
    boxed=True,
  )  # fmt: skip
  mesh = parallel.make_mesh(config_lib.base().mesh)
  _, _, rows = sharding.state_shardings(jax.eval_shape(init), mesh, RULES)
  by_name = {r["name"]: r for r in rows}
  row, column = (
    by_name["opt_state/0/v_row/hidden_0/kernel"],
    by_name["opt_state/0/v_col/hidden_0/kernel"],
  )
  assert (row["shape"], row["mesh"]) == ((128,), (None,))  # of the 784 x 128 kernel
  assert (column["shape"], column["mesh"]) == ((784,), (None,))
  # A parameter it does not factor gets size-1 placeholders there: never sharded.
  assert by_name["opt_state/0/v_row/hidden_0/bias"]["mesh"] == (None,)
  head = by_name["opt_state/0/v/head/kernel"]  # 128 x 10: 10 < 128, not factored
  assert head["shape"] == (128, 10) and head["mesh"] == ("model", None)


MESHES = {"dp": "8,1,1", "fsdp": "2,4,1", "tp": "4,1,2"}


def _mesh_runs(tmp_path, devices, specs, tfds_data_dir, raw_dir, workroot="runs"):
  out = tmp_path / f"losses_{devices}.json"
  # Every model's CPU flags (runtime.CPU_FLAGS: convolutions on XLA's own kernels), not
  # the LM's YNNPACK dots nor jaxlib's YNNPACK convolutions: YNNPACK blocks its sums by
  # the per-device batch, so 8 devices round differently from one and training
  # amplifies it (measured, CNN on 8-way data parallel: first loss beyond 1e-6
  # relative at step 13, 3.7e-3 by step 50; XLA's kernels: <= 1.6e-7 over 50 steps).
  # What is tested here is the sharding, not a kernel library's summation order.
  env = dict(
    os.environ,
    XLA_FLAGS=runtime.xla_flags_for("", devices_flags(devices)),
    RESEARCH_XLA_DEFAULTS="0",
    PYTHONPATH=str(config_lib.REPO_ROOT),
  )
  result = subprocess.run(
    [sys.executable, "tests/helpers/mesh_runs.py", str(out), tfds_data_dir, raw_dir,
     str(tmp_path / workroot if workroot != "runs" else tmp_path / f"runs_{devices}"), *specs],
    capture_output=True, text=True, cwd=config_lib.REPO_ROOT, env=env, timeout=900,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(out.read_text())


# Lines of each model's sharding table on a mesh (runs_8/MODEL_DATA_FSDP_MODEL/sharding.md):
# tensor parallel splits the dense layers over `model`; FSDP shards the convolutions.
SHARDING_LINES = {
  ("cnn", "tp"): [
    "| fc1/kernel | (9216, 128) | (embed, mlp) | (fsdp, model) | 2,359,296 |",
    "| head/kernel | (128, 10) | (mlp, classes) | (model, -) | 2,560 |",
  ],
  ("cnn", "fsdp"): [
    "| conv2/kernel | (3, 3, 32, 64) | (-, -, conv_in, conv_out) | (-, -, -, fsdp) | 18,432 |"
  ],
  ("lm", "tp"): [
    "| block_0_attention/query | (64, 4, 16) | (embed, heads, kv) | (fsdp, model, -) |",
    "| block_1_mlp/fc_out/kernel | (256, 64) | (mlp, embed) | (model, fsdp) |",
  ],
  ("mlp", "fsdp"): ["| hidden_0/kernel | (784, 128) | (embed, mlp) | (fsdp, model) | 100,352 |"],
}


# One test per model (pytest-xdist spreads them over its workers).
@pytest.mark.parametrize("model", ["mlp", "cnn", "lm", "resnet", "vit"])
def test_dp_fsdp_tp_losses_equal_one_device(
  model, mnist, tfds_data_dir, mnist_raw_dir, tmp_path
):  # fmt: skip
  del mnist  # prepared by the session fixture
  one = _mesh_runs(tmp_path, 1, [f"{model}:1,1,1"], tfds_data_dir, mnist_raw_dir)
  specs = [f"{model}:{mesh}" for mesh in MESHES.values()]
  eight = _mesh_runs(tmp_path, 8, specs, tfds_data_dir, mnist_raw_dir)
  reference = one[f"{model}:1,1,1"]
  assert len(reference) == 50
  # The ResNet's first convolution gradient after the stem sums ~25k terms that
  # cancel: 8 devices sum them in another order and differ by 3e-5 relative at
  # init (measured), which BatchNorm and momentum amplify. Measured against one
  # device: steps 1-8 within 1.1e-6 on every mesh; from step 9 the 8-way
  # reductions (data 8, and data 2 x fsdp 4) drift, 1.2e-4 by step 12 and 6.5e-3
  # at most over 50 steps, while data 4 x model 2 holds 1e-7 to step 12. Steps
  # 1-8 at 1e-5; step 1 alone shows a BatchNorm that averaged per device
  # instead of over the global batch. All 50 steps must stay within 2e-2.
  # The CNN's trajectory amplifies the same 1e-7 differences in some draws of its
  # dropout masks: over seeds 0-12 on 8-way data parallel (same masks on both, by
  # checksum), the loss drifted beyond 1e-5 within 50 steps for 4 seeds with
  # 32-bit masks and 7 with layers.dropout_mask's packed ones (seed 0 among
  # them: 1.5e-6 at step 12, 3.8e-4 at most), never beyond 1e-6 before step 11.
  steps = {"resnet": 8, "cnn": 10}.get(model, 50)
  for name, mesh in MESHES.items():
    losses = eight[f"{model}:{mesh}"]
    assert losses[:steps] == pytest.approx(reference[:steps], rel=1e-5), name
    assert losses == pytest.approx(reference, rel=2e-2), name
    table = (tmp_path / "runs_8" / f"{model}_{mesh.replace(',', '_')}" / "sharding.md").read_text()
    for line in SHARDING_LINES.get((model, name), []):
      assert line in table, (name, line)


def test_checkpoint_restores_across_meshes(mnist, tfds_data_dir, mnist_raw_dir, tmp_path):
  """Saved on 1 device, resumed on 8 as data=4 x model=2, then back on 1: same losses."""
  del mnist

  def segment(devices, spec):
    spec += ":constant"  # the schedule must not move when num_train_steps grows
    return _mesh_runs(tmp_path, devices, [spec], tfds_data_dir, mnist_raw_dir, "shared")[spec]

  straight = segment(1, "mlp:1,1,1:60:straight")
  segment(1, "mlp:1,1,1:20:moved")
  segment(8, "mlp:4,1,2:40:moved")
  moved = segment(1, "mlp:1,1,1:60:moved")
  # metrics.jsonl holds every segment in order: steps 1-20, 21-40 (8 devices), 41-60.
  assert len(moved) == 60
  assert moved == pytest.approx(straight, rel=1e-5)


SAVE_REPLICATED = """
import sys
import jax, jax.numpy as jnp, numpy as np
from orbax.checkpoint._src.serialization import replica_slices
from research import checkpoint
sliced = []  # each replica's share of a replicated array, as Orbax cuts it
original = replica_slices.ReplicaSlice.data
def data(self):
  sliced.extend([self.slice_args] if self.slice_args is not None else [])
  return original(self)
replica_slices.ReplicaSlice.data = data
if sys.argv[2] == "orbax_default":
  checkpoint.use_array_handler = lambda: None
mesh = jax.make_mesh((8,), ("data",))
w = jax.device_put(jnp.arange(64.0).reshape(8, 8), jax.NamedSharding(mesh, jax.P()))
ckpt = checkpoint.Checkpointer(sys.argv[1], 2)
ckpt.save(1, {"w": w, "b": w[0]}, {})
ckpt.close()
np.testing.assert_array_equal(checkpoint.read_tree(sys.argv[1])[1]["w"], np.asarray(w))
print(len(sliced))
"""


@pytest.mark.parametrize("handler", ["research", "orbax_default"])
def test_one_process_saves_each_replicated_array_from_one_replica(handler, tmp_path):
  """Orbax's default on the CPU cuts each replicated array into one slice per replica
  (a dispatch each, a compile per new shape); in one process that only costs time."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(config_lib.REPO_ROOT))
  env["XLA_FLAGS"] = devices_flags(8)
  result = subprocess.run(
    [sys.executable, "-c", SAVE_REPLICATED, str(tmp_path / "ckpt"), handler],
    capture_output=True, text=True, env=env, timeout=300,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  assert int(result.stdout.split()[-1]) == (0 if handler == "research" else 16)
