#!/usr/bin/env bash
# Train on GPUs with SLURM: one task per node, and each task drives every GPU SLURM gave its node.
# fgpair_jax/distributed.py joins the srun tasks into one JAX job and, unlike JAX's own SLURM detection
# (which gives each task only GPU number SLURM_LOCALID), lets a task that is alone on its node use all of
# its GPUs. See launch/README.md for why this layout and what else works.
#
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh configs/cub.py /shared/runs/cub_r50 --config.model.dtype=bfloat16
#   sbatch --nodes=1 --gpus-per-node=1 launch/slurm_gpu.sh configs/cub.py runs/cub_r50   # the paper's single-GPU run
#
# Assumes the repository is installed in the active environment (pip install -e . 'jax[cuda12]'), and
# that the workdir and the data are on storage every node sees under the same path.
#SBATCH --job-name=fgpair_jax
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --output=%x-%j.out
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: sbatch [slurm options] $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
CONFIG=$1 WORKDIR=$2
shift 2
# One task per node (the #SBATCH default above; `--ntasks-per-node=8 --gpus-per-task=1` works too). A task
# that fails ends the others at once (--kill-on-bad-exit), not after JAX's heartbeat timeout.
# Preemption and the time limit: SLURM sends SIGTERM (here also 120 s before the limit); every task then
# saves the same step and exits, and submitting the same command again resumes (sbatch --requeue
# has SLURM do that).
srun --kill-on-bad-exit=1 python -m fgpair_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
