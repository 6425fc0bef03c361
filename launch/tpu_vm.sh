#!/usr/bin/env bash
# Run research.train on a Cloud TPU VM or pod slice: create it, copy this
# checkout, install with .[tpu], run the same command on every worker (logs
# stream here), delete the VM at the end (unless --keep).
#
#   launch/tpu_vm.sh [--dry_run] --name=NAME --zone=ZONE --accelerator_type=v5litepod-16
#                    [--version=tpu-ubuntu2204-base] [--project=P] [--keep] -- TRAIN_FLAGS...
set -euo pipefail
dry_run=0 keep=0 name="" zone="" accelerator_type="" version="tpu-ubuntu2204-base" project=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry_run) dry_run=1 ;;
    --keep) keep=1 ;;
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --accelerator_type=*) accelerator_type=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown option $1 (valid: --dry_run --keep --name= --zone= --accelerator_type= --version= --project=, then -- TRAIN_FLAGS)" >&2; exit 2 ;;
  esac
  shift
done
for required in name zone accelerator_type; do
  if [ -z "${!required}" ]; then
    echo "tpu_vm.sh: --${required}= is required" >&2
    exit 2
  fi
done
repo=$(cd "$(dirname "$0")/.." && pwd)
archive=/tmp/research-${name}.tar.gz
train_flags=$(printf ' %q' "$@")
gcloud_tpu="gcloud compute tpus tpu-vm"
where="--zone=${zone}${project:+ --project=${project}}"
commands=(
  "git -C ${repo} archive --format=tar.gz -o ${archive} HEAD"
  "${gcloud_tpu} create ${name} ${where} --accelerator-type=${accelerator_type} --version=${version}"
  "${gcloud_tpu} scp ${archive} ${name}:research.tar.gz ${where} --worker=all"
  "${gcloud_tpu} ssh ${name} ${where} --worker=all --command='mkdir -p research && tar -xzf research.tar.gz -C research && cd research && python3 -m venv .venv && . .venv/bin/activate && pip install -e \".[tpu]\"'"
  "${gcloud_tpu} ssh ${name} ${where} --worker=all --command='cd research && . .venv/bin/activate && RESEARCH_DISTRIBUTED=auto python -m research.train${train_flags}'"
)
delete="${gcloud_tpu} delete ${name} ${where} --quiet"
if [ "$dry_run" -eq 1 ]; then
  printf '%s\n' "${commands[@]}"
  [ "$keep" -eq 1 ] || echo "$delete"
  exit 0
fi
[ "$keep" -eq 1 ] || trap 'eval "$delete"' EXIT
for command in "${commands[@]}"; do
  echo "+ $command"
  eval "$command"
done
