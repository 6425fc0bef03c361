"""Why the GPT-2-shaped LM's train state took 84-88 s to compile on an H200: its init
compiled one way per process, timed (results/benchmarks_gpu.md, 2026-11-26).

    python launch/gpu_init_probe.py VARIANT OUT_DIR [--smoke]

VARIANT is a form of the init, then options joined by "+":
  const          research's own program (the params key a constant in it)
  arg            the key an argument of the program
  params_only    the model's init alone (no optimizer state)
  xla_attention  the model with XLA's attention in place of cuDNN's
  rbg            JAX's "rbg" random-number generator in place of threefry
  +nomof         XLA's multi-output fusion pass off (experiment.INIT_COMPILER_OPTIONS)
  +no_autotune   xla_gpu_autotune_level=0
  +par           xla_gpu_force_compilation_parallelism=16
  +o1            LLVM at -O1 (what research uses for the init on the CPU:
                 experiment.CPU_INIT_COMPILER_OPTIONS; 3-4x faster to compile there)
Prints one JSON line (compile seconds, lines and fusions of the optimised program) and
writes that program to OUT_DIR/init_VARIANT.hlo.txt. Run several in parallel, one
process each: compiling happens on the host.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

VARIANTS = ("const", "arg", "params_only", "xla_attention", "rbg")
OPTIONS = {
  "nomof": {"xla_disable_hlo_passes": "multi_output_fusion"},
  "no_autotune": {"xla_gpu_autotune_level": 0},
  "par": {"xla_gpu_force_compilation_parallelism": 16},
  "o1": {"xla_backend_optimization_level": 1},
}


def main():
  variant, out = sys.argv[1], Path(sys.argv[2])
  form, *extras = variant.split("+")
  if form not in VARIANTS or any(e not in OPTIONS for e in extras):
    sys.exit(f"unknown variant {variant!r}: valid: {'|'.join(VARIANTS)} then +{'/+'.join(OPTIONS)}")
  import jax

  if form == "rbg":
    jax.config.update("jax_default_prng_impl", "rbg")
  from research import config as config_lib
  from research import experiment
  from research import step as step_lib

  config = config_lib.load_file("experiments/shakespeare_char.py:size=gpt2")
  if form == "xla_attention":
    config.model.attention = "xla"
  if "--smoke" in sys.argv:
    config.model.num_layers, config.model.embed_dim, config.model.num_heads = 2, 32, 2
    config.data.seq_len = config.model.max_len = 32
  exp = experiment.build(config)
  key = experiment.rng_for(config.seed, "params")
  inputs = exp.dataset.eval["inputs"][:1]
  t0 = time.perf_counter()
  if form in ("arg", "rbg"):
    init = functools.partial(step_lib.init_state, exp.model, exp.tx)
    lowered = jax.jit(lambda k: init(k, inputs), out_shardings=exp.state_sharding).lower(key)
  elif form == "params_only":
    dummy = step_lib.model_inputs(jax.numpy.zeros(inputs.shape, inputs.dtype))
    lowered = jax.jit(lambda k: exp.model.init({"params": k}, dummy, train=False)).lower(key)
  else:
    lowered = jax.jit(exp.init, out_shardings=exp.state_sharding).lower()
  t1 = time.perf_counter()
  options = {k: v for e in extras for k, v in OPTIONS[e].items()}
  compiled = lowered.compile(compiler_options=options or None)
  t2 = time.perf_counter()
  hlo = compiled.as_text()
  row = {
    "variant": variant, "device": jax.devices()[0].device_kind, "lower_s": t1 - t0,
    "compile_s": t2 - t1, "hlo_lines": hlo.count("\n"), "fusions": hlo.count(" fusion("),
  }  # fmt: skip
  print(json.dumps(row), flush=True)
  out.mkdir(parents=True, exist_ok=True)
  (out / f"init_{variant}.hlo.txt").write_text(hlo)


if __name__ == "__main__":
  main()
