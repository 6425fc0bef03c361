"""research.bench in smoke mode (every section, tiny sizes), and the speed features it
measures: FLOP counts and MFU in the train log, the per-model XLA defaults, the compilation
cache, the reshape max-pool, the PyTorch twins. No timing is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from research import bench, flops, metrics, runtime
from research import config as config_lib
from research.models import layers


def test_smoke_run_writes_every_section(tmp_path, tfds_data_dir, mnist_raw_dir, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", tfds_data_dir)
  (tmp_path / "benchmarks.md").write_text("old tables\n\n## Discussion\n\nhand-written\n")
  results = bench.run(smoke=True, out=str(tmp_path / "benchmarks"))
  saved = json.loads((tmp_path / "benchmarks.json").read_text())
  assert saved["smoke"] and set(bench.SECTIONS) <= set(saved)
  assert saved["versions"]["jax"] == jax.__version__
  for family in ("mlp", "cnn", "lm"):
    row = results["speed"][family]
    assert row["research_steps_per_sec"] > 0 and row["hand_jax_steps_per_sec"] > 0
    ratios = row["overhead_window_ratios"]  # each framework window between two hand ones
    assert len(ratios) >= 1 and min(ratios) <= row["overhead_ratio"] * (1 + 1e-12)
    assert row["overhead_ratio"] <= max(ratios) * (1 + 1e-12)
    if "torch_eager_steps_per_sec" in row:  # with the bench extra
      assert row["torch_eager_default_malloc_steps_per_sec"] > 0
      # research.train / PyTorch: the two bracketed ratios chained (hand windows
      # between PyTorch's, one fewer)
      between = row["hand_over_torch_eager_window_ratios"]
      assert len(between) == len(ratios) and row["hand_over_torch_eager"] > 0
      want = row["overhead_ratio"] * row["hand_over_torch_eager"]
      assert row["vs_torch_eager"] == pytest.approx(want)
  assert 0 < results["mfu"]["mfu_6n"] < results["mfu"]["mfu_with_attention"] < 1
  for family, row in results["input"].items():  # each in a process with train's flags
    assert 0 <= row["wait_fraction"] < 1 and row["loader_examples_per_sec"] > 0
    assert row["loader_share_of_step"] > 0 and row["rate_over_fixed"]["host"] > 0
    assert row["xla_flags"] == bench.train_env(family, smoke=True)["XLA_FLAGS"]
  for row in results["checkpoint"].values():
    assert 0 < row["blocked_sec"] <= row["save_total_sec"] and row["restore_sec"] > 0
  mesh = results["checkpoint_mesh"]  # 8 CPU devices, both array handlers
  assert mesh["devices"] == 8 and mesh["arrays"] > 50
  assert all(
    mesh[h]["first_blocked_sec"] > 0 and mesh[h]["blocked_sec"] > 0 for h in ("research", "orbax")
  )
  startup = results["startup"]["mlp"]
  assert startup["cold"]["first_step_sec"] > 0 and startup["warm"]["first_step_sec"] > 0
  assert startup["cold"]["init_compile_sec"] > 0  # the state init's line, parsed
  report = (tmp_path / "benchmarks.md").read_text()
  for heading in ("## Speed", "## MFU", "## Input pipeline", "## Checkpointing", "## Start-up"):
    assert heading in report
  assert "| Orbax default |" in report
  assert "old tables" not in report and report.endswith("## Discussion\n\nhand-written\n")


def test_bracketed_ratio_cancels_a_steady_drift():
  # The machine slows 10% per window; the framework's windows run at the hand loop's
  # speed of their moment: each ratio is ~1, the plain ratio of medians is not.
  hand = [100 * 0.9**i for i in (0, 2, 4, 6)]
  framework = [100 * 0.9**i for i in (1, 3, 5)]
  ratio, ratios = bench.bracketed_ratio(framework, hand)
  assert len(ratios) == 3 and ratio == pytest.approx(1.0, abs=0.01)
  assert bench.bracketed_ratio([50.0], [100.0, 100.0])[0] == 0.5
  # summed times: a window half as fast weighs as two (the median of ratios would be 1)
  ratio, ratios = bench.bracketed_ratio([100.0, 50.0, 100.0], [100.0] * 4)
  assert ratios == [1.0, 0.5, 1.0] and ratio == pytest.approx(3 / 4)
  # neighbours far apart (a first window slowed by compilation): the ratio stays within
  # the per-window ratios, its time-weighted mean
  ratio, ratios = bench.bracketed_ratio([80.0, 90.0], [10.0, 100.0, 100.0])
  assert ratios == pytest.approx([4.4, 0.9]) and min(ratios) <= ratio <= max(ratios)
  with pytest.raises(ValueError):
    bench.bracketed_ratio([1.0, 1.0], [1.0, 1.0])  # needs one more neighbour than windows


def test_host_bound_rows_are_a_tiny_mlp_with_one_and_ten_steps_per_call():
  """The full run's extra speed rows (the smoke run skips them): valid configs."""
  one, _ = bench.family_config("mlp_host", smoke=False)
  ten, _ = bench.family_config("mlp_host_10", smoke=False)
  for config in (one, ten):
    config_lib.validate(config)
    assert tuple(config.model.widths) == (8,) and config.data.pp_train == ""
  assert (one.steps_per_dispatch, ten.steps_per_dispatch) == (1, 10)
  assert bench.family_config("mlp", smoke=False)[0].steps_per_dispatch == 1


def test_unknown_section_is_one_clear_error(tmp_path):
  with pytest.raises(Exception, match="unknown.*'speeed'.*valid"):
    bench.run(("speeed",), smoke=True, out=str(tmp_path / "b"))


def test_progress_reports_tokens_flops_and_mfu():
  progress = metrics.Progress(0, 100, 8, tokens_per_step=8 * 64, flops_per_device_step=2e12,
                              peak_per_device=8e12)  # fmt: skip
  assert progress.report(0) == {}  # no step since the meter started: no rate, no ETA
  speed = progress.report(5)
  assert set(speed) >= {"tokens_per_sec", "tflops_per_device", "mfu"}
  assert speed["mfu"] == pytest.approx(speed["tflops_per_device"] * 1e12 / 8e12)
  assert speed["tokens_per_sec"] == pytest.approx(speed["steps_per_sec"] * 512)


def test_progress_leaves_excluded_time_out_of_the_rate(monkeypatch):
  clock = iter([0.0, 10.0, 30.0])  # the meter starts at 0; reports at 10 s and 30 s
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
  progress = metrics.Progress(0, 100, 8)
  assert progress.report(10)["steps_per_sec"] == pytest.approx(1.0)
  progress.exclude(10.0)  # e.g. writing a profile's trace
  assert progress.report(20)["steps_per_sec"] == pytest.approx(1.0)  # 10 steps in 20 - 10 s


def test_first_log_line_has_no_rate_or_eta(monkeypatch):
  lines = []  # absl's handlers vary with what ran before in this process: record the calls
  monkeypatch.setattr(metrics.logging, "info", lambda fmt, *args: lines.append(fmt % args))
  metrics.log_line(1, 10, {"loss": 2.5, "learning_rate": 0.0}, {})
  metrics.log_line(
    2, 10, {"loss": 2.4, "learning_rate": 0.1}, {"examples_per_sec": 8, "eta_sec": 9}
  )
  assert lines == [
    "step 1/10 loss=2.5000 lr=0",
    "step 2/10 loss=2.4000 lr=0.1 examples/s=8 ETA 0:00:09",
  ]


def test_compiled_flops_is_xlas_count():
  matmul = jax.jit(lambda a, b: a @ b)
  compiled = matmul.lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile()
  assert flops.compiled_flops(compiled) == pytest.approx(2 * 64 * 32 * 16, rel=0.01)


def test_train_logs_mfu_tokens_and_the_steps_memory(tmp_path, tfds_data_dir, monkeypatch):
  from research import train
  from research.metrics import read_jsonl

  config, _ = bench.family_config("lm", smoke=True)
  config.data.data_dir = tfds_data_dir
  config.num_train_steps, config.log_every_steps = 4, 2
  lines = []
  monkeypatch.setattr(train.logging, "info", lambda fmt, *args: lines.append(str(fmt) % args))
  train.train_and_evaluate(config, str(tmp_path))
  assert [line for line in lines if line.startswith("[MEMORY] train step per device")]
  logged = [r["metrics"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
  assert logged and all({"tokens_per_sec", "tflops_per_device", "mfu"} <= set(m) for m in logged)
  assert all(0 < m["mfu"] < 1 for m in logged)
  assert logged[-1]["tokens_per_sec"] == pytest.approx(logged[-1]["examples_per_sec"] * 16)


def test_xla_defaults_are_per_model_added_once_and_yield_to_the_user(monkeypatch):
  if not runtime.xla_defaults_apply():
    pytest.skip("this jaxlib is outside the versions the flags were tested with")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  runtime.apply_xla_defaults("cnn")  # every model: XLA's convolutions, not YNNPACK's
  without_ynn_conv = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
  assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {without_ynn_conv}"
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  runtime.apply_xla_defaults("transformer_lm")  # its own list replaces every model's
  runtime.apply_xla_defaults("transformer_lm")
  flags = os.environ["XLA_FLAGS"]
  assert flags.count("ynn_fusion_type") == 1 and flags.count("ynn_fusion_type=dot") == 1
  assert "device_count=2" in flags
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot,reduce")
  runtime.apply_xla_defaults("transformer_lm")
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("RESEARCH_XLA_DEFAULTS", "0")
  runtime.apply_xla_defaults("transformer_lm")
  assert os.environ["XLA_FLAGS"] == ""


def test_ynn_reduces_reads_the_fusion_list_as_xla_does():
  flag = "--xla_cpu_experimental_ynn_fusion_type="
  assert runtime.ynn_reduces("")  # jaxlib's default list has reduce
  assert runtime.ynn_reduces("--xla_force_host_platform_device_count=8")
  assert runtime.ynn_reduces(f"{flag}-individual_convolution")  # the default list, edited
  assert not runtime.ynn_reduces(f"{flag}-individual_convolution,-reduce")
  assert not runtime.ynn_reduces(f"{flag}dot")  # the LM's: a list replaces the default
  assert runtime.ynn_reduces(f"{flag}dot,reduce")
  assert not runtime.ynn_reduces(f"{flag}dot,reduce {flag}dot")  # the last one counts
  if runtime.xla_defaults_apply():  # research.train's: YNNPACK's reductions but for the LM
    assert runtime.ynn_reduces(runtime.xla_flags_for("cnn"))
    assert not runtime.ynn_reduces(runtime.xla_flags_for("transformer_lm"))


_CONV_KERNELS = """
import jax, jax.numpy as jnp
from research.models import layers
conv = layers.conv(64, 3, "VALID", "float32")
x = jnp.ones((8, 26, 26, 32))
params = conv.init(jax.random.key(0), x)
grad = jax.jit(jax.grad(lambda p, x: jnp.sum(conv.apply(p, x) ** 2), argnums=(0, 1)))
hlo = grad.lower(params, x).compile().as_text()
lines = hlo.splitlines()
ynn_convs = [l for l in lines if "__ynn_fusion" in l and "conv_general_dilated" in l]
print(sum(" convolution(" in l for l in lines), len(ynn_convs))
"""


def test_cpu_flags_give_convolutions_to_xla_not_ynnpack():
  """jaxlib 0.10 runs a forward convolution in YNNPACK (2.4x slower here than XLA's on
  the MNIST CNN's second layer); research.train's flags keep all three of a conv's
  forward and gradients on XLA's kernels."""
  if not runtime.xla_defaults_apply():
    pytest.skip("this jaxlib is outside the versions the flags were tested with")

  def kernels(xla_flags: str) -> tuple[int, int]:  # (convolutions, in YNNPACK fusions)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _CONV_KERNELS], env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return tuple(int(n) for n in out.stdout.split())

  assert runtime.xla_flags_for("resnet_cifar") == runtime.xla_flags_for("cnn")
  assert kernels(runtime.xla_flags_for("cnn")) == (3, 0)
  assert kernels("")[1] >= 1  # jaxlib's default: the forward in YNNPACK


_REALLOCATE = """
import ctypes, resource, sys, threading
from research import runtime
applied = runtime.tune_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
faults = []
def work():  # on another thread, as XLA's compute threads allocate
  for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(200 << 20)
    ctypes.memset(block, 1, 200 << 20)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(applied, faults[-1])
"""


def test_tuned_malloc_reuses_a_freed_large_block_without_page_faults():
  if not sys.platform.startswith("linux"):
    pytest.skip("glibc malloc only")

  def third_allocation(setting):
    env = dict(os.environ, RESEARCH_MALLOC_TUNING=setting)
    done = subprocess.run([sys.executable, "-c", _REALLOCATE], env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    applied, faults = done.stdout.split()
    return applied == "True", int(faults)

  applied, tuned = third_allocation("1")
  if not applied:
    pytest.skip("not glibc")
  applied, untuned = third_allocation("0")
  assert not applied and untuned >= 50  # 51,200 with 4 KB pages; 100 with 2 MB pages
  assert tuned <= untuned // 20  # the same pages again


def test_malloc_is_tuned_only_where_jax_computes_on_the_cpu(tmp_path):
  """One arena serialises XLA's compile threads: not with a GPU or TPU plugin installed,
  unless $JAX_PLATFORMS puts the CPU first."""
  if not sys.platform.startswith("linux"):
    pytest.skip("glibc malloc only")
  plugin = tmp_path / "jax_plugins" / "xla_cuda13"  # a plugin as JAX finds one (not run)
  plugin.mkdir(parents=True)
  (plugin / "__init__.py").write_text("raise ImportError('never imported')\n")
  code = "from research import runtime; print(runtime.accelerator_plugins(), runtime.tune_malloc())"

  def run(**env):
    base = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env = {**base, "RESEARCH_MALLOC_TUNING": "1", **env}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    return done.stdout.strip()

  on_cpu = run()
  if on_cpu.endswith("False"):
    pytest.skip("not glibc, or this machine has an accelerator plugin")
  assert on_cpu == "[] True"
  with_gpu = f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
  assert run(PYTHONPATH=with_gpu) == "['xla_cuda13'] False"
  assert run(PYTHONPATH=with_gpu, JAX_PLATFORMS="cpu") == "['xla_cuda13'] True"
  assert run(JAX_PLATFORMS="cuda,cpu") == "[] False"


def test_compilation_cache_writes_programs_to_its_directory(tmp_path):
  code = (
    "import research, jax, jax.numpy as jnp; from research import runtime;"
    f"runtime.enable_compilation_cache({str(tmp_path)!r});"
    "jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(7)).block_until_ready()"
  )
  subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
  assert any(tmp_path.iterdir())
  env = {**os.environ, "RESEARCH_COMPILATION_CACHE": "off"}
  code = "from research import runtime; print(runtime.compilation_cache_dir())"
  printed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert printed.stdout.strip() == "None"


def test_reshape_max_pool_matches_flax():
  x = jax.random.normal(jax.random.key(0), (4, 9, 8, 3))  # odd height: last row dropped
  np.testing.assert_array_equal(layers.max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)))
  # ties in every window's order: zeros (ReLU), one tied pair, and all four equal
  tied = jnp.round(jax.nn.relu(x) * 2) / 2
  tied = tied.at[:, 0:2, 0:2].set(1.0).at[:, 2, 2:4].set(3.0)
  dy = jax.random.normal(jax.random.key(1), (4, 4, 4, 3))
  for inputs in (x, tied):
    grad = lambda pool, inputs=inputs: jax.grad(lambda x: jnp.sum(pool(x) * dy))(inputs)
    np.testing.assert_array_equal(
      grad(layers.max_pool_2x2), grad(lambda x: nn.max_pool(x, (2, 2), (2, 2)))
    )
  # jitted (the residual is the first maximum's position); a window with a NaN passes
  # NaN forward and no gradient back
  inputs = tied.at[0, 0, 0, 0].set(jnp.nan)
  pooled, pull = jax.jit(lambda x: jax.vjp(layers.max_pool_2x2, x))(inputs)
  (dx,) = pull(dy)
  assert jnp.isnan(pooled[0, 0, 0, 0]) and not jnp.isnan(pooled[0, 0, 0, 1])
  assert jnp.all(dx[0, 0:2, 0:2, 0] == 0) and jnp.all(dx[0, 0, 0, 1:] == dy[0, 0, 0, 1:])
  assert jnp.sum(dx != 0) == dy.size - 1  # one position per other window


@pytest.mark.parametrize("family", ["mlp", "cnn", "lm"])
def test_torch_twins_have_the_same_parameter_count_and_train(family, tfds_data_dir, monkeypatch):
  pytest.importorskip("torch")
  from research import registry, torch_models

  monkeypatch.setenv("TFDS_DATA_DIR", tfds_data_dir)
  config, _ = bench.family_config(family, smoke=True)
  dataset = registry.datasets.get(config.data.name)(config.data)
  hand = bench.HandLoop(config, dataset, num_batches=2)
  trainer = torch_models.Trainer(family, config, hand.batches)
  assert trainer.run(2) > 0
  flax_count = sum(x.size for x in jax.tree.leaves(hand.params))
  torch_count = sum(p.numel() for p in trainer.model.parameters())
  assert torch_count == flax_count
  assert math.isfinite(hand.run(2))


def test_step_memory_is_xlas_plan_and_its_line_names_the_device_size():
  step = jax.jit(lambda state, x: (state + (x @ x).sum(), (x @ x).sum()), donate_argnums=0)
  plan = metrics.step_memory(step.lower(jnp.ones((256, 256)), jnp.ones((512, 512))).compile())
  assert plan["arguments"] == 4 * (256 * 256 + 512 * 512)
  assert plan["donated"] == 4 * 256 * 256  # the state's buffer is the new state's
  assert (
    plan["total"] == plan["arguments"] + plan["outputs"] - plan["donated"] + plan["temporaries"]
  )
  plan = {"arguments": 2_500_000_000, "outputs": 2_500_001_000, "donated": 2_500_000_000,
          "temporaries": 40_000_000_000, "total": 42_500_001_000}  # fmt: skip
  assert metrics.memory_line(plan, {"bytes_limit": 80e9}) == (
    "train step per device, as XLA planned it: 42.5 GB (state and batch 2.5 GB, "
    "temporaries 40 GB, outputs not donated 1 kB); the device has 80 GB"
  )
  assert metrics.memory_line(plan, None).endswith("outputs not donated 1 kB)")  # the CPU


def test_log_line_shows_a_devices_peak_memory(monkeypatch):
  lines = []
  monkeypatch.setattr(metrics.logging, "info", lambda fmt, *args: lines.append(fmt % args))
  assert metrics.peak_memory(None) == {}  # the CPU reports no memory_stats
  memory = metrics.peak_memory({"peak_bytes_in_use": 61.5e9, "bytes_limit": 80e9})
  assert memory == {"peak_memory_gb": 61.5}
  metrics.log_line(1, 10, {"loss": 2.5, "learning_rate": 0.0}, memory)  # the first step
  metrics.log_line(2, 10, {"loss": 2.4, "learning_rate": 0.1},
                   {"examples_per_sec": 8, "eta_sec": 9, **memory})  # fmt: skip
  assert lines == [
    "step 1/10 loss=2.5000 lr=0 peak_memory=61.5GB",
    "step 2/10 loss=2.4000 lr=0.1 examples/s=8 peak_memory=61.5GB ETA 0:00:09",
  ]
