#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: the same command runs on every host (--worker=all); JAX detects the
# slice and joins the hosts into one job, each host feeding its own share of the global batch.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_pod.sh my-v4-32 us-central2-b configs/cub.py /mnt/shared/runs/cub_r50 --config.model.dtype=bfloat16
#
# WORKDIR and the data (config.data.manual_dir / data_dir) must be visible to every host under the same
# path (a gcsfuse mount or NFS). The repository is copied to each host from this checkout.
#
# On each host the job runs detached (setsid nohup): a dropped ssh connection does not stop it. Its log
# is WORKDIR/logs/<host>.log; this script returns once every host has started. Python: stock TPU VM
# images ship 3.10, the package needs >= 3.11 (as do current JAX, flax, orbax and grain), so a host
# without it gets CPython 3.11 from uv (installed from PyPI, like the rest). Rerun the same command to
# resume; a preempted slice resumes from its latest checkpoint.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT

# What each host runs, detached: install (once per host) then train.
{
  echo 'set -euo pipefail'
  echo 'mkdir -p ~/fgpair_jax && tar -C ~/fgpair_jax -xzf /tmp/fgpair_jax.tgz && cd ~/fgpair_jax'
  echo 'if [ ! -x ~/.fgpair_venv/bin/python ]; then'
  echo '  if python3 -c "import sys; sys.exit(sys.version_info < (3, 11))"; then'
  echo '    python3 -m venv ~/.fgpair_venv'
  echo '  else'
  echo '    python3 -m pip install --user -q uv'
  echo '    ~/.local/bin/uv venv -q --seed --python 3.11 ~/.fgpair_venv'
  echo '  fi'
  echo 'fi'
  echo "~/.fgpair_venv/bin/python -m pip install -q -e . 'jax[tpu]'"
  printf 'exec ~/.fgpair_venv/bin/python -m fgpair_jax.main --config=%q --workdir=%q' "$CONFIG" "$WORKDIR"
  for override in "$@"; do printf ' %q' "$override"; done
  echo
} >"$STAGE/fgpair_run.sh"
tar -C "$REPO_DIR" --exclude=.git --exclude=.venv --exclude=workdirs -czf "$STAGE/fgpair_jax.tgz" .

gcloud compute tpus tpu-vm scp "$STAGE/fgpair_jax.tgz" "$STAGE/fgpair_run.sh" "$TPU_NAME":/tmp/ \
  --zone "$ZONE" --worker=all
LOGS=$(printf '%q' "$WORKDIR/logs")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "mkdir -p $LOGS && setsid nohup bash /tmp/fgpair_run.sh >$LOGS/\$(hostname).log 2>&1 </dev/null & echo \"started on \$(hostname)\""
echo "Training runs detached on every host of $TPU_NAME; logs: $WORKDIR/logs/<host>.log. Follow worker 0 with:"
echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=0 --command 'tail -f $WORKDIR/logs/*.log'"
