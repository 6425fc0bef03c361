#!/usr/bin/env bash
# Submit research.train to SLURM: one process per GPU, jax.distributed detects SLURM itself.
#
#   launch/slurm.sh [--dry_run] [--nodes=N] [--gpus_per_node=G] [--time=HH:MM:SS]
#                   [--partition=P] [--venv=PATH] -- TRAIN_FLAGS...
#
# Writes the batch script beside the run (WORKDIR/slurm.sbatch) and submits it
# with sbatch; --dry_run prints the script and the sbatch command instead.
set -euo pipefail
dry_run=0 nodes=1 gpus_per_node=8 time_limit=24:00:00 partition="" venv=".venv"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry_run) dry_run=1 ;;
    --nodes=*) nodes=${1#*=} ;;
    --gpus_per_node=*) gpus_per_node=${1#*=} ;;
    --time=*) time_limit=${1#*=} ;;
    --partition=*) partition=${1#*=} ;;
    --venv=*) venv=${1#*=} ;;
    --) shift; break ;;
    *) echo "slurm.sh: unknown option $1 (valid: --dry_run --nodes= --gpus_per_node= --time= --partition= --venv=, then -- TRAIN_FLAGS)" >&2; exit 2 ;;
  esac
  shift
done
workdir=""
for flag in "$@"; do
  case "$flag" in --workdir=*) workdir=${flag#*=} ;; esac
done
if [ -z "$workdir" ]; then
  echo "slurm.sh: the train flags after -- need --workdir=DIR" >&2
  exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
train_flags=$(printf ' %q' "$@")
script=$(cat <<SBATCH
#!/bin/bash
#SBATCH --job-name=research-$(basename "$workdir")
#SBATCH --nodes=${nodes}
#SBATCH --ntasks-per-node=${gpus_per_node}
#SBATCH --gpus-per-node=${gpus_per_node}
#SBATCH --time=${time_limit}
#SBATCH --output=${workdir}/slurm-%j.out
${partition:+#SBATCH --partition=${partition}}
set -euo pipefail
cd ${repo}
source ${venv}/bin/activate
srun --kill-on-bad-exit=1 python -m research.train${train_flags}
SBATCH
)
if [ "$dry_run" -eq 1 ]; then
  echo "# ${workdir}/slurm.sbatch"
  echo "$script"
  echo "# then: sbatch ${workdir}/slurm.sbatch"
  exit 0
fi
mkdir -p "$workdir"
echo "$script" > "$workdir/slurm.sbatch"
sbatch "$workdir/slurm.sbatch"
