#!/bin/bash
# Submit one training run to SLURM: writes a readable sbatch script to slurm_logs/ and submits it
# (`taming-dist launch sbatch ... --submit`). Run it from the folder the job should work in:
#   NODES=2 PARTITION=gpu launch/submit.sh vqgan-f16-1024 out_dir=/checkpoint/$USER/runs name=vq-f16
# Arguments after CONFIG are key=value overrides and any `taming-dist launch sbatch` option
# (--account A, --qos Q, --sbatch=--exclusive, ...); those win over the defaults below.
set -euo pipefail
config=${1:?usage: launch/submit.sh CONFIG [key=value ...] [taming-dist launch sbatch options]}
shift
job=${JOB_NAME:-taming-dist}
opts=(--nodes "${NODES:-1}" --gpus-per-node "${GPUS_PER_NODE:-8}" --cpus-per-task "${CPUS_PER_TASK:-10}"
      --time-min "${TIME_MIN:-1440}" --job-name "$job" --out "slurm_logs/$job-$(date +%Y%m%d-%H%M%S).sbatch")
if [ -n "${PARTITION:-}" ]; then opts+=(--partition "$PARTITION"); fi
# The job runs this interpreter (the sbatch script's --python default): activate the environment first.
exec "${PYTHON:-python}" -m taming_dist launch sbatch "${opts[@]}" --submit "$config" "$@"
