#!/usr/bin/env bash
# Issue 8's GPU benchmarks, on one GPU, in one go (results/benchmarks_gpu.md). Parts, in
# the order of $PARTS (default "gpt2 cnn bench"), each under its own time limit:
#   gpt2     GPT-2 small's shape (experiments/shakespeare_char.py:size=$LM_SIZE, default
#            gpt2; gpt2_124m: with GPT-2's padded vocabulary, 124M parameters; bf16,
#            cuDNN attention) under research.train: MFU from its log line;
#   profile  launch/gpu_lm_profile.py: that LM's ($LM_SIZE) bare jitted step by attention variant
#            ($VARIANTS, e.g. "cudnn:32 cudnn:64") and the first one's per-kernel
#            profile (written as soon as the first variant has run);
#   cnn      MNIST CNN (experiments/mnist_cnn.py) time to 99% test accuracy,
#            evaluating every 100 steps;
#   bench    python -m research.bench --sections=$SECTIONS (default speed, mfu, input,
#            checkpoint, startup): the CPU benchmark's sections at the same sizes (speed
#            written after each family, every section after it ends: the limit may cut
#            the last).
#
#   OUT=results/gpu bash launch/gpu_benchmarks.sh        # SMOKE=1: tiny sizes (CPU check)
#   PARTS="gpt2 profile cnn bench" VARIANTS="cudnn:32 cudnn:64" SECTIONS=speed,input \
#     bash launch/gpu_benchmarks.sh                      # one 10-minute device call
#
# Per-part limits in seconds: GPT2_LIMIT (180), PROFILE_LIMIT (540), CNN_LIMIT (100),
# BENCH_LIMIT (270). GPT2_EXTRA: more flags for the gpt2 run; GPT2_RETRY=0: no retry
# with XLA's attention after a failed gpt2 run. GPT2_RUNS="128 128:xent_two_pass": one
# research.train run each (GPT2_LIMIT each, no retry) instead of one at the config's
# batch, in the order given: BATCH (the loss as losses.ONE_PASS_XENT_BACKENDS says: one
# pass on GPUs), then any of :xent_one_pass / :xent_two_pass (the loss's max, sum and
# argmax in one pass over the logits, or in two reductions and an argmax, on every
# backend) and :triton_off (XLA's GEMMs on cuBLAS, not Triton). An entry given again
# (A/B runs alternating) logs to NAME_2.log, NAME_3.log and so on. On a
# GPU, $OUT/clocks.csv samples the SM clock, power and temperature every second
# throughout (a clock that drops under sustained load would explain research.train's
# windows running slower than a 10-step burst of the bare step).
#
# Needs prepared TFDS data for mnist, fashion_mnist and tiny_shakespeare in
# $TFDS_DATA_DIR (for a device machine, launch/gpu_prepare.sh makes it and the wheels).
# The outputs land in $OUT.
set -uo pipefail
OUT=${OUT:-results/gpu}
PY=${PY:-python3}
SMOKE=${SMOKE:-0}
PARTS=${PARTS:-gpt2 cnn bench}
SECTIONS=${SECTIONS:-speed,mfu,input,checkpoint,startup}
export LM_SIZE=${LM_SIZE:-gpt2}
[ "${PROFILE:-0}" = 1 ] && PARTS=profile  # the older spelling
for part in $PARTS; do  # all checked before anything runs
  case "$part" in
    gpt2 | profile | cnn | bench) ;;
    *) echo "unknown part '$part': valid: gpt2 profile cnn bench" >&2; exit 2 ;;
  esac
done
for entry in ${GPT2_RUNS:-}; do
  if ! [[ "$entry" =~ ^[1-9][0-9]*(:xent_one_pass|:xent_two_pass)?(:triton_off)?$ ]]; then
    echo "GPT2_RUNS entry '$entry': valid: BATCH[:xent_one_pass|:xent_two_pass][:triton_off]" >&2
    exit 2
  fi
done
mkdir -p "$OUT"
work=$(mktemp -d)
export PYTHONUNBUFFERED=1
# research.runtime's per-model XLA flags are CPU kernels: none on the GPU.
export RESEARCH_XLA_DEFAULTS=0
export RESEARCH_COMPILATION_CACHE="$work/jax_cache"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  > "$OUT/gpu.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/gpu.txt"
sampler=""
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,utilization.gpu \
    --format=csv -l 1 > "$OUT/clocks.csv" 2>&1 &
  sampler=$!
fi
"$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" \
  | tee -a "$OUT/gpu.txt"

gpt2=(--config.log_every_steps=50 --config.eval_every_steps=-1 ${GPT2_EXTRA:-})
cnn=(--config.eval_every_steps=100)
bench=()
if [ "$SMOKE" = 1 ]; then
  gpt2+=(--config.num_train_steps=4 --config.log_every_steps=2 --config.schedule.warmup_steps=1 --config.model.num_layers=1
    --config.model.embed_dim=32 --config.model.num_heads=2 --config.model.max_len=32
    --config.data.seq_len=32 --config.global_batch_size=2 --config.eval_batch_size=4)
  cnn+=(--config.num_train_steps=300 --config.model.conv_features="(4,8)")
  bench+=(--smoke)
fi

part_profile() {
  echo "== profile: GPT-2-small-shaped LM's step by attention variant, per-kernel profile"
  local smoke_flag=()
  [ "$SMOKE" = 1 ] && smoke_flag=(--smoke)
  VARIANTS=${VARIANTS:-} timeout "${PROFILE_LIMIT:-540}" "$PY" launch/gpu_lm_profile.py "$OUT" \
    "${smoke_flag[@]}" > "$OUT/lm_profile.log" 2>&1
  echo "exit $?"
  grep -v "^[IWE][0-9]" "$OUT/lm_profile.log" | tail -n 40
}

# research.train with the cross-entropy in one pass over the logits (first argument
# xent_one_pass) or in two (xent_two_pass) on every backend.
XENT_TRAIN='
import runpy, sys
from research import losses
one_pass = sys.argv.pop(1) == "xent_one_pass"
losses.ONE_PASS_XENT_BACKENDS = frozenset({"cpu", "gpu", "tpu"} if one_pass else ())
sys.argv = ["research.train", *sys.argv[1:]]
runpy.run_module("research.train", run_name="__main__", alter_sys=True)
'

# NAME LIMIT [FLAGS...]: research.train in $work/NAME, logged to $OUT/NAME.log; with
# $xent set (xent_one_pass or xent_two_pass), through XENT_TRAIN.
train_gpt2() {
  local train=(-m research.train)
  [ -n "${xent:-}" ] && train=(-c "$XENT_TRAIN" "$xent")
  timeout "$2" "$PY" "${train[@]}" --config=experiments/shakespeare_char.py:size="$LM_SIZE" \
    --workdir="$work/$1" "${gpt2[@]}" "${@:3}" > "$OUT/$1.log" 2>&1
}

gpt2_runs() {  # each of $GPT2_RUNS, logged to $OUT/gpt2_bBATCH[_xent_one_pass].log etc.
  local entry batch code base name flags used=" " n
  for entry in $GPT2_RUNS; do
    batch=${entry%%:*}
    code=${entry#"$batch"}
    code=${code#:}
    base=gpt2_b$batch${code:+_${code//:/_}}
    name=$base
    n=1
    while [[ "$used" == *" $name "* ]]; do
      n=$((n + 1))
      name=${base}_$n
    done
    used+="$name "
    flags=${XLA_FLAGS:-}
    [[ "$code" == *triton_off ]] && flags+=" --xla_gpu_enable_triton_gemm=false"
    code=${code%triton_off}
    echo "-- $name"
    echo "XLA_FLAGS=$flags"
    XLA_FLAGS=$flags xent=${code%:} train_gpt2 "$name" "${GPT2_LIMIT:-180}" \
      --config.global_batch_size="$batch"
    echo "exit $?"
    grep -E "step .*MFU|TIMING\] (state init|first step)|MEMORY\]|^  attention:" "$OUT/$name.log" | sed 's/^.*\] //'
  done
}

part_gpt2() {
  echo "== gpt2: GPT-2-small-shaped LM, bf16, size=$LM_SIZE"
  if [ -n "${GPT2_RUNS:-}" ]; then
    gpt2_runs
    return
  fi
  train_gpt2 gpt2 "${GPT2_LIMIT:-180}"
  local status=$?
  echo "exit $status"
  if [ "$status" != 0 ] && [ "${GPT2_RETRY:-1}" = 1 ]; then  # XLA's attention, once
    tail -n 3 "$OUT/gpt2.log"
    train_gpt2 gpt2_xla_attention 100 --config.model.attention=xla
    echo "XLA attention: exit $?"
    grep -E "step .*MFU" "$OUT/gpt2_xla_attention.log" | sed 's/^.*\] //'
  fi
  grep -E "step .*MFU|TIMING\] (state init|first step)|MEMORY\]|metrics at step|^  attention:" "$OUT/gpt2.log" | sed 's/^.*\] //'
}

part_cnn() {
  echo "== cnn: MNIST CNN, time to 99% test accuracy"
  local start
  start=$(date +%s.%N)
  timeout "${CNN_LIMIT:-100}" "$PY" -m research.train --config=experiments/mnist_cnn.py --workdir="$work/cnn" \
    "${cnn[@]}" > "$OUT/mnist_cnn.log" 2>&1
  echo "exit $?"
  "$PY" - "$work/cnn/metrics.jsonl" "$start" <<'EOF2' | tee "$OUT/mnist_cnn_time_to_99.txt"
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
EOF2
}

part_bench() {
  echo "== bench: research.bench --sections=$SECTIONS"
  # PyTorch shares the GPU with JAX here: no preallocation of 75% of its memory.
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${BENCH_LIMIT:-270}" "$PY" -m research.bench \
    --sections="$SECTIONS" --out="$OUT/benchmarks_gpu" "${bench[@]}" > "$OUT/bench.log" 2>&1
  echo "exit $?"
  tail -n 5 "$OUT/bench.log"
}

for part in $PARTS; do
  echo "$(date -u +%H:%M:%S) $part" >> "$OUT/gpu.txt"  # to place the parts in clocks.csv
  "part_$part"
done
[ -n "$sampler" ] && kill "$sampler"
rm -rf "$work"
