#!/usr/bin/env bash
# Prepares, in the repository's root, what a device call of launch/gpu_benchmarks.sh
# needs beside the repository (the device image has JAX, Flax, Optax, Orbax and absl, but
# no ml-collections or TFDS, and it reaches no network):
#   .whl       wheels for Python 3.12 of ml-collections, TFDS 4.9.10 and the packages
#              TFDS needs that the image lacks (`promise` has no wheel: built here);
#   .gpu_data  TFDS_DATA_DIR with $DATASETS (default "tiny_shakespeare mnist": the gpt2,
#              profile and cnn parts; the bench part's input section also reads
#              fashion_mnist) prepared from ../shared/data; an image dataset as its
#              decoded arrays only (compressed research_arrays/*.npz, which research.data
#              reads before any TFDS file), its tfrecords left out; tiny_shakespeare
#              with its splits' text beside them (research_arrays/*.txt: the device has
#              no TensorFlow to read tfrecords): 13 MB, 42 MB with fashion_mnist (a call
#              carries at most 64 MiB with the repository).
# Both are ignored through .git/info/exclude, so only a call's `carry` takes them:
#   bash launch/gpu_prepare.sh
#   run(carry=[".whl", ".gpu_data"], command="python3 -m pip install -q --no-index
#     --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
#     export PYTHONPATH=/tmp/site:$PWD TFDS_DATA_DIR=$PWD/.gpu_data || exit; ...")
# PY: the Python that runs pip and research (default: python3; this repository's
# environment, for research.data).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DATASETS=${DATASETS:-tiny_shakespeare mnist}
for name in $DATASETS; do  # checked before anything is removed
  case "$name" in
    tiny_shakespeare | mnist | fashion_mnist) ;;
    *) echo "DATASETS: unknown '$name': valid: tiny_shakespeare mnist fashion_mnist" >&2; exit 2 ;;
  esac
done
mkdir -p .git/info
for path in /.whl/ /.gpu_data/; do
  grep -qxF "$path" .git/info/exclude 2> /dev/null || echo "$path" >> .git/info/exclude
done

rm -rf .whl && mkdir .whl
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  ml-collections==1.1.0 tensorflow-datasets==4.9.10 array-record==0.8.6 dm-tree \
  immutabledict simple-parsing tensorflow-metadata termcolor toml tensorboardX \
  importlib-resources docstring-parser googleapis-common-protos
"$PY" -m pip wheel -q --no-deps -w .whl promise==2.3

rm -rf .gpu_data
TFDS_DATA_DIR="$PWD/.gpu_data" "$PY" - $DATASETS << 'EOF'
import sys

import numpy as np

from research import config
from research.data import sources, text

for name in sys.argv[1:]:
  builder = sources.prepare(name, config.raw_data_dir(name))
  if name == "tiny_shakespeare":  # its splits' text, which research.data reads there
    text.load_texts(builder, sorted(builder.info.splits))  # without TensorFlow
  else:  # decoded once here; compressed, since they travel
    for split in ("train", "test"):
      arrays = sources.load_arrays(builder, split)
      np.savez_compressed(sources.cache_path(builder, split, ".npz"), **arrays)
EOF
# The image datasets are read from their arrays there: their tfrecords, and TFDS's
# extracted downloads, stay out.
find .gpu_data -path '*mnist*' -name '*.tfrecord*' -delete
rm -rf .gpu_data/downloads
du -sh .whl .gpu_data
