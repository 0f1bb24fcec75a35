#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: the same command runs on every host (--worker=all); JAX joins
# the hosts into one job, each host feeds its own slice of the global batch.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_pod.sh my-v4-32 us-central2-b configs/cub.py /mnt/shared/runs/cub_r50 --config.model.dtype=bfloat16
#
# WORKDIR and the data (config.data.manual_dir / data_dir) must be visible to every host under the same
# path (a gcsfuse mount or NFS). The repository is copied to each host from this checkout.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
OVERRIDES="$*"
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)

tar -C "$REPO_DIR" --exclude=.git --exclude=.venv --exclude=workdirs -czf /tmp/fgpair_jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/fgpair_jax.tgz "$TPU_NAME":/tmp/fgpair_jax.tgz --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  mkdir -p ~/fgpair_jax && tar -C ~/fgpair_jax -xzf /tmp/fgpair_jax.tgz && cd ~/fgpair_jax
  python3 -m venv ~/.fgpair_venv && . ~/.fgpair_venv/bin/activate
  pip install -q -e . 'jax[tpu]'
  python -m fgpair_jax.main --config=$CONFIG --workdir=$WORKDIR $OVERRIDES
"
