"""Shared fixtures: real MNIST prepared once per session by TFDS from ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers.xla import OPT_LEVEL

from research import config as config_lib

# Most of the tests' time is XLA compiling a few hundred programs that then run a few
# steps each. LLVM at -O1 (XLA:CPU's default is -O2) compiles them faster: the whole
# suite 1135 -> 959 s on 2 cores (session 25; the MNIST CNN's train step 1.73 -> 1.14 s
# to compile, its loss equal to the bit); every test passed at both levels. Processes a
# test starts inherit it; those given an XLA_FLAGS of their own (the multi-device ones)
# take it through helpers.xla.devices_flags. Speed figures come from research.bench,
# never from a test. An XLA_FLAGS that sets the level keeps its own.
if OPT_LEVEL not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {OPT_LEVEL}=1".strip()


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory) -> str:
  """$TFDS_DATA_DIR when set (reuse prepared data), else a fresh directory for this run,
  one for all its pytest-xdist workers (sources.prepare makes them take turns)."""
  if os.environ.get("TFDS_DATA_DIR"):
    return os.environ["TFDS_DATA_DIR"]
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # basetemp is the run's folder / the worker's
    root = root.parent
  path = root / "tensorflow_datasets"
  path.mkdir(exist_ok=True)
  return str(path)


@pytest.fixture(scope="session")
def mnist_raw_dir() -> str:
  raw_dir = config_lib.raw_data_dir("mnist")
  assert raw_dir and Path(raw_dir, "train-images-idx3-ubyte.gz").is_file(), (
    "the real MNIST files are needed: set RESEARCH_RAW_DATA or put them in ../shared/data/mnist"
  )
  return raw_dir


@pytest.fixture(scope="session")
def mnist(tfds_data_dir, mnist_raw_dir):
  """The real MNIST dataset, prepared offline through TFDS's own builder."""
  from research import registry

  data_config = config_lib.base().data
  data_config.raw_dir = mnist_raw_dir
  data_config.data_dir = tfds_data_dir
  return registry.datasets.get("mnist")(data_config)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """Runs (and the subprocesses tests start) share one compilation cache per session,
  never the user's ~/.cache."""
  os.environ["RESEARCH_COMPILATION_CACHE"] = str(tmp_path_factory.mktemp("jax_cache"))
  yield
