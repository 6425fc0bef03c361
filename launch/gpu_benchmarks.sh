#!/usr/bin/env bash
# Issue 8's GPU benchmarks, on one GPU, in one go (results/benchmarks_gpu.md):
#   1. GPT-2 small's shape (experiments/shakespeare_char.py:size=gpt2, bf16, cuDNN
#      attention) under research.train: MFU from its log line;
#   2. MNIST CNN (experiments/mnist_cnn.py) time to 99% test accuracy, evaluating
#      every 100 steps;
#   3. python -m research.bench: speed (vs PyTorch on the GPU), mfu, input, checkpoint,
#      startup: the CPU benchmark's sections at the same sizes (speed written after
#      each family, every section after it ends: the time limit may cut the last).
#
#   4. with PROFILE=1 only (instead of 1-3, to fit one 10-minute device call):
#      launch/gpu_lm_profile.py, the LM's step by attention variant and its per-kernel
#      profile (written as soon as the first variant has run).
#
#   OUT=results/gpu bash launch/gpu_benchmarks.sh        # SMOKE=1: tiny sizes (CPU check)
#
# Needs prepared TFDS data for mnist, fashion_mnist and tiny_shakespeare in
# $TFDS_DATA_DIR. Each part has its own time limit; the outputs land in $OUT.
set -uo pipefail
OUT=${OUT:-results/gpu}
PY=${PY:-python3}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT"
work=$(mktemp -d)
export PYTHONUNBUFFERED=1
# research.runtime's per-model XLA flags are CPU kernels: none on the GPU.
export RESEARCH_XLA_DEFAULTS=0
export RESEARCH_COMPILATION_CACHE="$work/jax_cache"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  > "$OUT/gpu.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/gpu.txt"
"$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" \
  | tee -a "$OUT/gpu.txt"

gpt2=(--config.log_every_steps=50 --config.eval_every_steps=-1)
cnn=(--config.eval_every_steps=100)
bench=()
if [ "$SMOKE" = 1 ]; then
  gpt2+=(--config.num_train_steps=4 --config.log_every_steps=2 --config.schedule.warmup_steps=1 --config.model.num_layers=1
    --config.model.embed_dim=32 --config.model.num_heads=2 --config.model.max_len=32
    --config.data.seq_len=32 --config.global_batch_size=2 --config.eval_batch_size=4)
  cnn+=(--config.num_train_steps=300 --config.model.conv_features="(4,8)")
  bench+=(--smoke)
fi

if [ "${PROFILE:-0}" = 1 ]; then
  echo "== 4. GPT-2-small-shaped LM: attention variants and per-kernel profile"
  smoke_flag=()
  [ "$SMOKE" = 1 ] && smoke_flag=(--smoke)
  timeout 540 "$PY" launch/gpu_lm_profile.py "$OUT" "${smoke_flag[@]}" > "$OUT/lm_profile.log" 2>&1
  echo "exit $?"
  grep -v "^[IWE][0-9]" "$OUT/lm_profile.log" | tail -n 40
  rm -rf "$work"
  exit 0
fi

echo "== 1. GPT-2-small-shaped LM, bf16"
timeout 180 "$PY" -m research.train --config=experiments/shakespeare_char.py:size=gpt2 \
  --workdir="$work/gpt2" "${gpt2[@]}" > "$OUT/gpt2.log" 2>&1
status=$?
echo "exit $status"
if [ "$status" != 0 ]; then  # e.g. no cuDNN attention here: XLA's own, once
  tail -n 3 "$OUT/gpt2.log"
  timeout 100 "$PY" -m research.train --config=experiments/shakespeare_char.py:size=gpt2 \
    --workdir="$work/gpt2_xla" "${gpt2[@]}" --config.model.attention=xla \
    > "$OUT/gpt2_xla_attention.log" 2>&1
  echo "XLA attention: exit $?"
  grep -E "step .*MFU" "$OUT/gpt2_xla_attention.log" | sed 's/^.*\] //'
fi
grep -E "step .*MFU|TIMING\] first step|metrics at step" "$OUT/gpt2.log" | sed 's/^.*\] //'

echo "== 2. MNIST CNN, time to 99% test accuracy"
start=$(date +%s.%N)
timeout 100 "$PY" -m research.train --config=experiments/mnist_cnn.py --workdir="$work/cnn" \
  "${cnn[@]}" > "$OUT/mnist_cnn.log" 2>&1
echo "exit $?"
"$PY" - "$work/cnn/metrics.jsonl" "$start" <<'EOF' | tee "$OUT/mnist_cnn_time_to_99.txt"
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
start = float(sys.argv[2])
first_train = min(r["time"] for r in records if r["split"] == "train")
tests = [r for r in records if r["split"] == "test"]
for r in tests:
  print(f"step {r['step']}: test accuracy {r['metrics']['accuracy']:.4f} "
        f"at {r['time'] - start:.1f} s from the command's start")
hit = next((r for r in tests if r["metrics"]["accuracy"] >= 0.99), None)
if hit:
  print(f"99%: step {hit['step']}, {hit['time'] - start:.1f} s from the command's start "
        f"(first log line at {first_train - start:.1f} s)")
else:
  print("99% not reached")
EOF

echo "== 3. research.bench"
# PyTorch shares the GPU with JAX here: no preallocation of 75% of its memory.
# Speed and input first: what changed since the first GPU run (one dispatch per step).
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 270 "$PY" -m research.bench --sections=speed,mfu,input,checkpoint,startup \
  --out="$OUT/benchmarks_gpu" "${bench[@]}" > "$OUT/bench.log" 2>&1
echo "exit $?"
tail -n 5 "$OUT/bench.log"
rm -rf "$work"
