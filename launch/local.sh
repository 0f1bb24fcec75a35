#!/usr/bin/env bash
# Start N processes of one JAX job on this machine, joined over loopback: how the multi-process tests
# run, and how to debug a multi-host problem without a cluster. Each process gets
# JAX_COORDINATOR_ADDRESS=127.0.0.1:<a free port>, JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i
# (fgpair_jax/distributed.py), and by default runs on the CPU with DEVICES_PER_PROCESS fake devices.
#
#   launch/local.sh 2 --config=configs/cub.py:tiny --workdir=workdirs/mp     # $PYTHON -m fgpair_jax.main ...
#   launch/local.sh 2 .venv/bin/python -m fgpair_jax.evaluate --workdir=workdirs/mp    # any other command
#   DEVICES_PER_PROCESS=2 LOG_DIR=logs launch/local.sh 2 --config=...        # 2 x 2 devices, a log per process
#
# Environment: PYTHON (default: the repository's .venv/bin/python when it exists, else python3; said on
# stderr when local.sh starts fgpair_jax.main itself), DEVICES_PER_PROCESS (default 1; fake CPU devices per process),
# JAX_PLATFORMS (default: cpu), PORT (default: a free one), LOG_DIR (default: none, output prefixed
# with "[i] " on this terminal; else LOG_DIR/process_<i>.log and LOG_DIR/process_<i>.pid).
# SIGTERM or Ctrl-C to this script is passed to every process (a preemption: they save and stop at one
# step). When a process fails, the others are stopped and one line says which process failed and how.
set -uo pipefail
if [ $# -lt 2 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES [--config.key=value ... | COMMAND ...]" >&2
  exit 2
fi
NUM_PROCESSES=$1
shift
if [ -z "${PYTHON:-}" ]; then
  REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
if [[ $1 == --* ]]; then
  set -- "$PYTHON" -m fgpair_jax.main "$@"
  echo "local.sh: $NUM_PROCESSES process(es) of $PYTHON -m fgpair_jax.main" >&2
fi
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$NUM_PROCESSES
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}"
[ -n "${LOG_DIR:-}" ] && mkdir -p "$LOG_DIR"

pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  if [ -n "${LOG_DIR:-}" ]; then
    JAX_PROCESS_ID=$i "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
    echo $! >"$LOG_DIR/process_$i.pid"
  else
    JAX_PROCESS_ID=$i "$@" > >(sed -u "s/^/[$i] /") 2>&1 &
  fi
  pids+=($!)
done

stop_all() {  # $1: signal
  for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2>/dev/null; done
}
trap 'stop_all TERM' TERM
trap 'stop_all INT' INT

# Wait for each process; the first failure stops the rest (a job without one of its processes cannot go on).
report() {  # $1: process index, $2: pid, $3: exit status
  [ "$3" -eq 0 ] || [ "$status" -ne 0 ] && return
  status=$3
  local how="exited with status $3"
  [ "$3" -gt 128 ] && how="was killed by signal $(($3 - 128)) ($(kill -l $(($3 - 128))))"
  echo "local.sh: process $1 (pid $2) $how; stopping the other processes." >&2
  stop_all TERM
  ( sleep 20; stop_all KILL ) >/dev/null 2>&1 &  # a process stuck in a collective with the failed one
  killer=$!
}
status=0
running=("${!pids[@]}")  # indices of the processes not yet waited for
while [ "${#running[@]}" -gt 0 ]; do
  live=()
  for i in "${running[@]}"; do live+=("${pids[$i]}"); done
  wait -n "${live[@]}" 2>/dev/null  # until one ends (or a trapped signal comes)
  still=()
  for i in "${running[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then still+=("$i"); continue; fi
    wait "${pids[$i]}"
    report "$i" "${pids[$i]}" $?
  done
  running=("${still[@]}")
done
[ -n "${killer:-}" ] && kill "$killer" 2>/dev/null
exit "$status"
