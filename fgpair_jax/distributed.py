"""Joining a multi-process JAX job (`jax.distributed`), from what the launcher put in the environment.

JAX runs one process per host (or per GPU), each running the same program over a mesh of every
process's devices. `jax.distributed.initialize` must come before anything creates a JAX backend
(`jax.devices()`, `jax.process_index()`, the first array), so the command lines call `maybe_initialize`
before any other JAX call. Where the job is described, first match wins:

- **Explicit**: `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`
  (`launch/local.sh` sets them). JAX itself reads `JAX_LOCAL_DEVICE_IDS` (the GPUs this process uses).
- **SLURM, inside an `srun` step** (`SLURM_STEP_ID` set) of more than one task: process `SLURM_PROCID` of
  `SLURM_NTASKS`, coordinator on the step's first node at `JAX_COORDINATOR_PORT`, else a port derived
  from the job id. Outside a step (the batch script itself, an `salloc` shell) `SLURM_NTASKS` describes
  the allocation, not processes that will come: the run stays one process and says how to use `srun`.
- **Cloud TPU VMs**: JAX detects the pod slice itself.

GPUs under SLURM (`slurm_local_device_ids`): JAX's own SLURM detection restricts each process to GPU
number `SLURM_LOCALID`, which leaves all but one GPU idle when one task drives a whole node, and is an
invalid ordinal when SLURM shows each task only its own GPU (jax-ml/jax issues 23452, 28194). Here a
task that is alone on its node, or sees a single GPU, uses every GPU it sees; only tasks that share
their node's GPUs take one each.

A peer that never arrives ends the wait after `FGPAIR_INITIALIZATION_TIMEOUT` seconds (default 300)
with one line. A process that dies or fails later ends the others in one line too (`liveness.py`).
"""
import dataclasses
import os
import re
import sys
import threading
from typing import Mapping, Optional, Tuple

import jax

from fgpair_jax import liveness
from fgpair_jax.errors import UserError

INITIALIZATION_TIMEOUT_ENV = "FGPAIR_INITIALIZATION_TIMEOUT"
DEFAULT_INITIALIZATION_TIMEOUT_S = 300
HEARTBEAT_TIMEOUT_ENV = "FGPAIR_HEARTBEAT_TIMEOUT"
DEFAULT_HEARTBEAT_TIMEOUT_S = 100  # JAX's default for its own heartbeats
JAX_TIMEOUT_MARGIN_S = 30  # JAX's own timeouts, later than ours (`_exit_unless_joined`, `liveness`)
EXIT_NOT_JOINED = 2  # like every one-line error of the command lines (cli.EXIT_USER_ERROR)
EXPLICIT_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# SLURM's ids of the steps that are not `srun` steps: the batch script and the "extern" step.
NOT_SRUN_STEPS = ("batch", "extern", "4294967294", "4294967295")
SLURM_PORT_BASE, SLURM_PORT_RANGE = 61440, 4096  # ports derived from the job id: 61440..65535


class DistributedInitError(UserError, RuntimeError):
    """The environment describes a multi-process job incompletely or inconsistently."""


@dataclasses.dataclass(frozen=True)
class Job:
    """A multi-process job as the launcher described it. `None` fields are left to JAX to detect."""

    launcher: str  # where the description came from, for messages
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[Tuple[int, ...]] = None  # None: every device this process sees


def _integer(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name, "")
    if not value.strip().isdigit():
        raise DistributedInitError(f"{name}={value!r} must be a non-negative integer.")
    return int(value)


def explicit_job(environ: Mapping[str, str]) -> Optional[Job]:
    """The job of `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`; None if none is set.
    Raises `DistributedInitError` naming what is missing or out of range."""
    present = [name for name in EXPLICIT_VARIABLES if environ.get(name)]
    if not present:
        return None
    missing = [name for name in EXPLICIT_VARIABLES if name not in present]
    if missing:
        raise DistributedInitError(
            f"{', '.join(present)} set but {', '.join(missing)} not: a multi-process job needs all of "
            f"{', '.join(EXPLICIT_VARIABLES)} (launch/local.sh sets them), or none of them.")
    num_processes, process_id = _integer(environ, "JAX_NUM_PROCESSES"), _integer(environ, "JAX_PROCESS_ID")
    if not 0 <= process_id < num_processes:
        raise DistributedInitError(f"JAX_PROCESS_ID={process_id} must lie in [0, JAX_NUM_PROCESSES={num_processes}).")
    return Job("JAX_COORDINATOR_ADDRESS", environ["JAX_COORDINATOR_ADDRESS"], num_processes, process_id)


def in_srun_step(environ: Mapping[str, str]) -> bool:
    """Whether this process is a task of an `srun` step (not the batch script or an `salloc` shell)."""
    return "SLURM_JOB_ID" in environ and environ.get("SLURM_STEP_ID", "batch") not in NOT_SRUN_STEPS


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM host list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^,\-\]]+))?", nodelist.strip())
    if not match:
        raise DistributedInitError(f"Cannot read a host name from SLURM_STEP_NODELIST={nodelist!r}.")
    prefix, first_index = match.groups()
    return prefix + (first_index or "")


def slurm_local_device_ids(environ: Mapping[str, str]) -> Optional[Tuple[int, ...]]:
    """The GPUs this SLURM task uses (None: every GPU it sees); see the module docstring.

    `JAX_LOCAL_DEVICE_IDS` is left to JAX. A task alone on its node (one task per node, the layout of
    `launch/slurm_gpu.sh`) or bound to one GPU (`--gpus-per-task=1`, `--gpu-bind`) uses what it sees;
    tasks sharing a node's GPUs take GPU `SLURM_LOCALID` each.
    """
    if environ.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    nodes = int(environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
    alone_on_node = _integer(environ, "SLURM_NTASKS") <= nodes
    visible = [gpu for gpu in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if gpu.strip()]
    if alone_on_node or len(visible) == 1:
        return None
    return (_integer(environ, "SLURM_LOCALID"),)


def slurm_job(environ: Mapping[str, str]) -> Optional[Job]:
    """The job of an `srun` step of more than one task; None outside SLURM, a step, or with one task."""
    if not in_srun_step(environ) or int(environ.get("SLURM_NTASKS", "1") or 1) <= 1:
        return None
    port = environ.get("JAX_COORDINATOR_PORT") or str(
        SLURM_PORT_BASE + _integer(environ, "SLURM_JOB_ID") % SLURM_PORT_RANGE)
    host = first_host(environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_NODELIST", ""))
    step = f"SLURM job {environ['SLURM_JOB_ID']} step {environ.get('SLURM_STEP_ID')}"
    return Job(step, f"{host}:{port}", _integer(environ, "SLURM_NTASKS"), _integer(environ, "SLURM_PROCID"),
               slurm_local_device_ids(environ))


def on_cloud_tpu_vm() -> bool:
    """Whether JAX found TPU chips and libtpu on this machine (it checks the PCI bus at `import jax`,
    creating no backend); JAX then detects the pod slice from the VM's metadata."""
    from jax._src import cloud_tpu_init  # JAX's own flag; there is no public one

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def describe_job(environ: Mapping[str, str], on_tpu_vm: bool = False) -> Optional[Job]:
    """The multi-process job this process belongs to, or None for a single-process run."""
    job = explicit_job(environ) or slurm_job(environ)
    if job is None and on_tpu_vm:
        job = Job("Cloud TPU VM")
    return job


def launch_hint(environ: Mapping[str, str]) -> Optional[str]:
    """A one-line hint when SLURM allocated several tasks but this process was not started by `srun`."""
    tasks = environ.get("SLURM_NTASKS", "1")
    if "SLURM_JOB_ID" in environ and not in_srun_step(environ) and tasks.isdigit() and int(tasks) > 1:
        return (f"SLURM allocated {tasks} tasks, but this process is not an srun task, so it trains alone on "
                "this node's devices; start it with `srun` to use them all (launch/slurm_gpu.sh).")
    return None


def _seconds(environ: Mapping[str, str], name: str, default: int) -> int:
    return max(1, _integer(environ, name)) if environ.get(name) else default


def initialization_timeout(environ: Mapping[str, str]) -> int:
    """Seconds to wait for every process to join (`FGPAIR_INITIALIZATION_TIMEOUT`, default 300)."""
    return _seconds(environ, INITIALIZATION_TIMEOUT_ENV, DEFAULT_INITIALIZATION_TIMEOUT_S)


def heartbeat_timeout(environ: Mapping[str, str]) -> int:
    """Seconds of silence after which a process of the job counts as dead and the others stop
    (`FGPAIR_HEARTBEAT_TIMEOUT`, default 100; `liveness.py`). JAX's own, later, is this plus
    `JAX_TIMEOUT_MARGIN_S`."""
    return _seconds(environ, HEARTBEAT_TIMEOUT_ENV, DEFAULT_HEARTBEAT_TIMEOUT_S)


def maybe_initialize(environ: Optional[Mapping[str, str]] = None) -> None:
    """Join the job the environment describes (see the module docstring); a no-op on a single process
    or when already joined. Call it before any other JAX call.

    Raises `DistributedInitError` (one line) for an incomplete description. When the processes have not
    all joined within the initialization timeout (a peer never started, or crashed), prints one line and
    ends the process with `EXIT_NOT_JOINED` (see `_exit_unless_joined`).
    """
    environ = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return
    hint = launch_hint(environ)
    if hint:
        print(f"warning: {hint}", file=sys.stderr, flush=True)  # not `announce`: it would create a backend
    job = describe_job(environ, on_cloud_tpu_vm())
    if job is None:
        return
    timeout = initialization_timeout(environ)
    detection = None if job.coordinator_address is None else "deactivate"  # else JAX overrides the GPUs
    joined = threading.Event()
    threading.Thread(target=_exit_unless_joined, args=(joined, job, timeout), daemon=True).start()
    try:
        jax.distributed.initialize(job.coordinator_address, job.num_processes, job.process_id,
                                   local_device_ids=list(job.local_device_ids) if job.local_device_ids else None,
                                   cluster_detection_method=detection,
                                   initialization_timeout=timeout + JAX_TIMEOUT_MARGIN_S,
                                   heartbeat_timeout_seconds=heartbeat_timeout(environ) + JAX_TIMEOUT_MARGIN_S)
    except Exception as error:  # JAX's detection found no slice (e.g. a TPU VM without pod metadata)
        if job.coordinator_address is not None:
            raise
        cause = " ".join(str(error).split())[:200]
        print(f"warning: JAX found TPU chips but could not detect a pod slice ({cause}); training as one "
              "process on this VM's TPUs.", file=sys.stderr, flush=True)
    finally:
        joined.set()
    if jax.distributed.is_initialized():
        liveness.start(heartbeat_timeout(environ), job.coordinator_address)


def _exit_unless_joined(joined: threading.Event, job: Job, timeout: int) -> None:
    """End the process with one line if `joined` is not set within `timeout` seconds.

    Why a thread of ours: when JAX's own `initialization_timeout` expires, its runtime aborts the process
    from C++ (a fatal log and a stack trace; JAX 0.10), and no Python exception ever reaches the caller.
    JAX's timeout is set `JAX_TIMEOUT_MARGIN_S` later, so this line comes first.
    """
    if joined.wait(timeout):
        return
    who = "this process" if job.process_id is None else f"process {job.process_id} of {job.num_processes}"
    where = job.coordinator_address or "the TPU coordinator"
    print(f"error: {who} could not join the job ({job.launcher}) at {where} within {timeout} s: start every "
          f"process of the job (one that is missing or crashed leaves the others waiting); "
          f"{INITIALIZATION_TIMEOUT_ENV} sets the wait.", file=sys.stderr, flush=True)
    os._exit(EXIT_NOT_JOINED)
