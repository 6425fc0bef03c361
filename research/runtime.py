"""Process-wide JAX settings the framework applies by default (each can be turned off).

1. XLA CPU flags (`apply_xla_defaults`, called by research.train and
   research.evaluate before any JAX backend starts), each measured faster on a
   2-core CPU (side by side in fresh processes; `python -m research.bench` keeps
   an XLA table of them):
   - for every model, XLA's own convolution kernels instead of YNNPACK's (jaxlib
     0.10's default list of YNNPACK fusions minus `individual_convolution`):
     YNNPACK's forward convolution ran 2.4x slower than XLA's on the MNIST CNN's
     second layer (128x26x26x32 -> 64, 3x3: 36 vs 15 ms), and the kernel gradient
     1.7x (41 vs 24 ms). With `layers.Conv` on XLA's convolution instead of
     im2col + matmul, against the im2col layer without the flag (a machine at ~43%
     of its usual speed): the CNN's train step 104-124 -> 95-100 ms (the code before
     and after, 3 pairs; 104-117 -> 92-103 in 4 more), ResNet-20's 660-764 ->
     345-399 ms, LeNet-5's 24-28 -> 16 ms. Programs without convolutions compile the
     same;
   - the Transformer LM: YNNPACK kernels for all dot products (`dot`; a list of
     names replaces the default list), 1665 -> 1303 ms per step at width 768 (858 ->
     673 at width 512); the same flag slowed the CNN (107 -> 119 ms) and left the
     MLP within noise. YNNPACK's elementwise and reduction fusions are never the
     fastest.
   Results equal to float32 rounding, but YNNPACK's rounding depends on the
   per-device batch (data parallel no longer matches one device to ~1e-7). Only
   for jaxlib versions whose flag parser was checked (an unknown XLA flag or value
   aborts the process; 0.10.2 run, 0.11.0 and 0.12.0 read from their binaries).
   Off with RESEARCH_XLA_DEFAULTS=0; a flag the user sets in XLA_FLAGS wins.
2. JAX's persistent compilation cache (`enable_compilation_cache`, called by
   the entry points): compiled programs are kept on disk, so the second start
   of a run (a resume, a sweep's next point, an evaluation) skips compilation.
   Directory: $RESEARCH_COMPILATION_CACHE, else ~/.cache/research/jax; "off"
   disables it.
3. glibc's malloc keeps freed memory for reuse (`tune_malloc`, called by the entry
   points before JAX starts its threads). XLA:CPU allocates each execution's
   temporary buffer (187 MB for the MNIST CNN's train step at batch 128, 760 MB
   for the benchmark LM's) on a compute thread; glibc serves an allocation that
   large from a fresh mmap and unmaps it when freed, so every step page-faults
   its whole working memory back in: 47,817 minor faults per CNN step, 194,504
   per LM step. With one arena, blocks up to KEEP_BYTES (1 GB) taken from the
   heap rather than mmapped, and up to 1 GB of free heap kept, the next step
   reuses the last one's pages: CNN 117 -> 72 ms, LM 1361 -> 1232 ms (2-core
   CPU, research.bench's shapes); PyTorch eager gains as well (CNN 66 -> 51 ms).
   The cost is memory: `research.train` on experiments/mnist_cnn.py holds
   1.28 GB while training instead of 0.83 GB, and peaks at 2.5 GB instead of 2.1
   GB while evaluating. Linux with glibc only; off with RESEARCH_MALLOC_TUNING=0.
   Only where the computation runs on the CPU (`computes_on_cpu`): one arena serialises
   the allocations of XLA's compile threads, and a GPU compile runs many (its
   autotuner builds candidate kernels in parallel). On an H200's 16-core host,
   research.train compiled the GPT-2-shaped LM's step in 56 s, the same step in a
   script without the tuning in 12-14 s; the MNIST CNN's step in 27-29 s, its
   evaluation in 11-13 s (results/benchmarks_gpu.md). The tuning is the suspected
   difference, not yet measured without it on the GPU.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

CPU_FLAGS = {  # XLA CPU flags for every model, measured faster (module docstring)
  "xla_cpu_experimental_ynn_fusion_type": "-individual_convolution",
}
MODEL_CPU_FLAGS = {  # model name -> flags replacing or adding to CPU_FLAGS for it
  "transformer_lm": {"xla_cpu_experimental_ynn_fusion_type": "dot"},
}
TESTED_JAXLIB = ((0, 10, 2), (0, 13, 0))  # [first, last) versions known to parse the flags


def _version_tuple(text: str) -> tuple[int, ...]:
  parts = []
  for piece in text.split(".")[:3]:
    digits = "".join(c for c in piece if c.isdigit())
    parts.append(int(digits or 0))
  return tuple(parts)


def _off(variable: str) -> bool:
  return os.environ.get(variable, "1").lower() in ("0", "false", "off")


def xla_defaults_apply() -> bool:
  if _off("RESEARCH_XLA_DEFAULTS"):
    return False
  try:
    version = _version_tuple(importlib.metadata.version("jaxlib"))
  except importlib.metadata.PackageNotFoundError:
    return False
  return TESTED_JAXLIB[0] <= version < TESTED_JAXLIB[1]


def xla_flags_for(model_name: str, current: str = "") -> str:
  """$XLA_FLAGS for a model: `current` plus the model's defaults the user has not set."""
  flags = {**CPU_FLAGS, **MODEL_CPU_FLAGS.get(model_name, {})} if xla_defaults_apply() else {}
  added = [f"--{name}={value}" for name, value in flags.items() if f"--{name}" not in current]
  return " ".join([current, *added]).strip()


def apply_xla_defaults(model_name: str) -> None:
  """Sets $XLA_FLAGS for `model_name` (before any JAX backend starts). Imports no JAX."""
  flags = xla_flags_for(model_name, os.environ.get("XLA_FLAGS", ""))
  if flags:
    os.environ["XLA_FLAGS"] = flags


YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def ynn_reduces(flags: str | None = None) -> bool:
  """Whether XLA:CPU hands reductions to YNNPACK under `flags` (default $XLA_FLAGS, which
  XLA reads once, when the backend starts): its default fusion list has `reduce`; a
  list of names replaces the default list (the LM's `dot`), names with a sign edit it.
  A process that changes $XLA_FLAGS after its backend started (several models trained
  in one process) reads the new value: optim.global_norm then takes the other form,
  the same norm at the other form's speed."""
  flags = os.environ.get("XLA_FLAGS", "") if flags is None else flags
  values = [f[len(YNN_FLAG) :] for f in flags.split() if f.startswith(YNN_FLAG)]
  if not values:
    return True
  names = [n.strip() for n in values[-1].split(",") if n.strip()]
  if any(n[0] in "+-" for n in names):
    return "-reduce" not in names
  return "reduce" in names


KEEP_BYTES = 1 << 30  # blocks up to this size come from (and stay in) the heap


def computes_on_cpu() -> bool:
  """Whether JAX will compute on the CPU, known before it starts: $JAX_PLATFORMS's
  first platform where set, else whether no GPU or TPU plugin is installed (looked
  up, not imported)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not accelerator_plugins()


def accelerator_plugins() -> list[str]:
  """The JAX GPU/TPU plugins installed, found as JAX finds them (the `jax_plugins`
  namespace package and entry-point group; libtpu) without importing them."""
  import importlib.metadata
  import importlib.util
  import pkgutil

  found = [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
  namespace = importlib.util.find_spec("jax_plugins")
  if namespace is not None and namespace.submodule_search_locations:
    found += [m.name for m in pkgutil.iter_modules(namespace.submodule_search_locations)]
  if importlib.util.find_spec("libtpu") is not None:
    found.append("libtpu")
  return found


def tune_malloc() -> bool:
  """glibc malloc for this process: one arena, blocks up to KEEP_BYTES from the heap,
  up to KEEP_BYTES of free heap kept (see 3. above), where JAX computes on the CPU;
  whether it applied. Call it before JAX (or anything else) starts threads: a thread
  that has already allocated keeps its own arena."""
  if _off("RESEARCH_MALLOC_TUNING") or not sys.platform.startswith("linux"):
    return False
  if not computes_on_cpu():
    return False
  import ctypes

  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has no mallopt options)
  except (OSError, AttributeError):
    return False
  m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # glibc's malloc.h
  applied = [
    libc.mallopt(m_arena_max, 1),
    libc.mallopt(m_mmap_threshold, KEEP_BYTES),
    libc.mallopt(m_trim_threshold, KEEP_BYTES),
  ]
  return all(applied)


def compilation_cache_dir() -> Path | None:
  setting = os.environ.get("RESEARCH_COMPILATION_CACHE", "")
  if setting.lower() in ("off", "0", "none", "false"):
    return None
  return Path(setting).expanduser() if setting else Path("~/.cache/research/jax").expanduser()


def enable_compilation_cache(directory: str | Path | None = None) -> Path | None:
  """Turns on JAX's persistent compilation cache (every program, however quick to
  compile); returns its directory, or None when disabled."""
  import jax

  directory = Path(directory) if directory else compilation_cache_dir()
  if directory is None:
    return None
  directory.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory
