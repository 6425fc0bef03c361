#!/usr/bin/env bash
# Run N processes of research.train on this machine (CPU devices, gloo collectives).
#
#   launch/local_multiprocess.sh 2 --config=experiments/mnist_mlp.py --workdir=runs/mlp_2proc
#
# Each process gets RESEARCH_COORDINATOR / RESEARCH_NUM_PROCESSES / RESEARCH_PROCESS_ID;
# output lines are prefixed with the process index. If one process fails, the
# others are stopped and the script exits with that failure's status; a SIGTERM
# to the script is passed on to every process.
set -uo pipefail
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES [research.train flags...]" >&2
  exit 2
fi
num_processes=$1
shift
port=${RESEARCH_PORT:-$((20000 + RANDOM % 20000))}
python=${PYTHON:-python}
pids=()
for ((i = 0; i < num_processes; i++)); do
  RESEARCH_COORDINATOR="localhost:${port}" RESEARCH_NUM_PROCESSES="$num_processes" \
    RESEARCH_PROCESS_ID="$i" "$python" -m research.train "$@" \
    > >(sed -u "s/^/[process $i] /") 2> >(sed -u "s/^/[process $i] /" >&2) &
  pids+=($!)
done
# A SIGTERM or Ctrl-C to this script reaches every process (they save and stop together).
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
running=("${pids[@]}")
while [ "${#running[@]}" -gt 0 ]; do
  finished=""
  wait -n -p finished "${running[@]}"
  code=$?
  [ -n "${finished:-}" ] || continue  # interrupted by a forwarded signal: keep waiting
  remaining=()
  for pid in "${running[@]}"; do
    [ "$pid" = "$finished" ] || remaining+=("$pid")
  done
  running=("${remaining[@]}")
  if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$code
    echo "local_multiprocess: a process exited with status $code; stopping the others" >&2
    kill "${running[@]}" 2>/dev/null
  fi
done
exit "$status"
