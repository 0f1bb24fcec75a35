#!/usr/bin/env bash
# Train on GPUs with SLURM: one task per node, all GPUs of a node in that task. jax.distributed
# reads the SLURM environment to join the tasks into one job (parallel.maybe_initialize_distributed).
#
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh configs/cub.py /shared/runs/cub_r50 --config.model.dtype=bfloat16
#   sbatch --nodes=1 --gpus-per-node=1 launch/slurm_gpu.sh configs/cub.py runs/cub_r50   # the paper's single-GPU run
#
# Assumes the repository is installed in the active environment: pip install -e . 'jax[cuda12]'.
#SBATCH --job-name=fgpair_jax
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: sbatch [slurm options] $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
CONFIG=$1 WORKDIR=$2
shift 2
# Preemption: SLURM sends SIGTERM before killing; the run resumes from its latest checkpoint when
# the same command is submitted again (add --requeue to sbatch to have SLURM do that).
srun python -m fgpair_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
