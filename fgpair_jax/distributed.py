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
with one line. A process that dies later without exiting (kill -9, the out-of-memory killer, a lost
host) ends the others too, in one line, once it has been silent for `FGPAIR_HEARTBEAT_TIMEOUT` seconds
(default 100): each process runs a `PeerWatch` thread that writes a heartbeat counter into the job's
key-value store (JAX's coordination service) and reads everyone else's. Why not JAX's own heartbeats:
they end the survivors too, but from C++ (a fatal log and a stack trace, JAX 0.10) that Python cannot
intercept; JAX's timeout is set `JAX_TIMEOUT_MARGIN_S` later than ours as the backstop. A process
that fails with an exception tells the others through the same store (`stop_after_failure`), and they
stop at once. The one ending that stays JAX's: when process 0 dies, so does the coordination service it
hosts, and JAX 0.10's client aborts the others within seconds from C++ (its `missed_heartbeat_callback`
cannot be set from Python: the status it passes fails to convert, `std::bad_cast`).
"""
import atexit
import dataclasses
import os
import re
import sys
import threading
import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import jax

from fgpair_jax.errors import UserError

INITIALIZATION_TIMEOUT_ENV = "FGPAIR_INITIALIZATION_TIMEOUT"
DEFAULT_INITIALIZATION_TIMEOUT_S = 300
HEARTBEAT_TIMEOUT_ENV = "FGPAIR_HEARTBEAT_TIMEOUT"
DEFAULT_HEARTBEAT_TIMEOUT_S = 100  # JAX's default for its own heartbeats
JAX_TIMEOUT_MARGIN_S = 30  # JAX's own timeouts, later than ours (`_exit_unless_joined`, `PeerWatch`)
HEARTBEATS_PER_TIMEOUT = 5  # `PeerWatch` writes and reads this many times per heartbeat timeout
EXIT_NOT_JOINED = 2  # like every one-line error of the command lines (cli.EXIT_USER_ERROR)
EXIT_PEER_LOST = 3  # a process of the job died or failed, so this one stops too (`PeerWatch`)
# The peer watch's directories in the job's key-value store, each holding one key per process index.
HEARTBEAT_KEY, EXITED_KEY, FAILED_KEY = "fgpair/heartbeat/", "fgpair/exited/", "fgpair/failed/"
# How a collective reports a peer that vanished (gloo, JAX's CPU collectives); NCCL waits instead.
LOST_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
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
    (`FGPAIR_HEARTBEAT_TIMEOUT`, default 100; `PeerWatch`)."""
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
        start_peer_watch(job, heartbeat_timeout(environ))


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


class PeerWatch:
    """Which processes of a job have gone silent: the bookkeeping of the peer watch, without the I/O.

    `observe` takes what the key-value store holds now, each process's heartbeat counter and the set of
    processes that exited in order, with the local monotonic time (clocks of different hosts are never
    compared: a peer is alive while its counter changes). A peer that has not written a new counter for
    `timeout_s` seconds, and has not said it exited, is lost; a peer that never wrote counts from the start.
    """

    def __init__(self, process_id: int, num_processes: int, timeout_s: float, now: float):
        self.process_id, self.timeout_s = process_id, timeout_s
        self.peers = [p for p in range(num_processes) if p != process_id]
        self.counters: Dict[int, str] = {}
        self.changed_at: Dict[int, float] = {p: now for p in self.peers}

    def observe(self, counters: Mapping[int, str], exited: Iterable[int], now: float) -> List[int]:
        """The peers silent for longer than the timeout (sorted), after taking in this observation."""
        exited = set(exited)
        for peer in self.peers:
            if peer in counters and counters[peer] != self.counters.get(peer):
                self.counters[peer], self.changed_at[peer] = counters[peer], now
        return [p for p in self.peers if p not in exited and now - self.changed_at[p] > self.timeout_s]

    @property
    def verdict_within_s(self) -> float:
        """Seconds after which a peer that died now has certainly been declared lost."""
        return self.timeout_s * (1 + 2 / HEARTBEATS_PER_TIMEOUT)


def _read_directory(client, directory: str) -> Dict[int, str]:
    """{process index: value} of the keys `<directory><index>` in the job's key-value store."""
    return {int(key.rsplit("/", 1)[-1]): value for key, value in client.key_value_dir_get(directory)}


def lost_peer_message(lost: List[int], num_processes: int, timeout_s: float, coordinator: str) -> str:
    """The one line a surviving process prints when peers went silent."""
    who = ", ".join(str(p) for p in lost)
    what = "process" if len(lost) == 1 else "processes"
    coordinator_lost = " (the coordinator)" if 0 in lost else ""
    return (f"error: {what} {who}{coordinator_lost} of {num_processes} went silent for {timeout_s:g} s (killed, out of "
            f"memory, or its host is gone), so this process stops too; rerun the job to resume from the last "
            f"checkpoint ({HEARTBEAT_TIMEOUT_ENV} sets the wait; job coordinator {coordinator}).")


def failed_peer_message(failed: Mapping[int, str], num_processes: int) -> str:
    """The one line a process prints when peers stopped with an error of their own."""
    process, line = min(failed.items())
    return f"error: process {process} of {num_processes} stopped ({line}), so this process stops too; see its log."


class _Membership:
    """This process's part in the job's liveness protocol: its peer watch and how it reports failure."""

    def __init__(self, client, watch: PeerWatch, num_processes: int, coordinator: str):
        self.client, self.watch, self.num_processes, self.coordinator = client, watch, num_processes, coordinator
        self.stop = threading.Event()

    def run(self, clock: Callable[[], float] = time.monotonic) -> None:
        """The watch loop (a daemon thread): heartbeat, read the others, end the process if one is lost.

        A store that cannot be reached counts as every peer's silence, the coordinator's included (it
        serves the store), so the others end within the same timeout whoever died.
        """
        key, beat = f"{HEARTBEAT_KEY}{self.watch.process_id}", 0
        interval = self.watch.timeout_s / HEARTBEATS_PER_TIMEOUT
        while not self.stop.wait(0 if beat == 0 else interval):
            beat += 1
            try:
                self.client.key_value_set(key, str(beat), allow_overwrite=True)
                counters, exited = _read_directory(self.client, HEARTBEAT_KEY), _read_directory(self.client, EXITED_KEY)
                failed = _read_directory(self.client, FAILED_KEY)
            except Exception:  # the coordinator (which serves the store) is unreachable: nobody is heard
                counters, exited, failed = {}, {}, {}
            failed.pop(self.watch.process_id, None)
            lost = self.watch.observe(counters, exited, clock())
            if self.stop.is_set():
                return
            if failed:
                self._end(failed_peer_message(failed, self.num_processes))
            if lost:
                self._end(lost_peer_message(lost, self.num_processes, self.watch.timeout_s, self.coordinator))

    def _end(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)

    def exited_in_order(self) -> None:
        """At interpreter exit: stop watching and tell the others this process is not lost."""
        self.stop.set()
        self._tell(EXITED_KEY, "1")

    def failed(self, line: str) -> None:
        """This process stops with an error: stop watching and tell the others why (their watch ends them)."""
        self.stop.set()
        self._tell(FAILED_KEY, line)

    def _tell(self, directory: str, value: str) -> None:
        try:
            self.client.key_value_set(f"{directory}{self.watch.process_id}", value, allow_overwrite=True)
        except Exception:  # the coordinator is gone already: nobody is left to tell
            pass


_membership: Optional[_Membership] = None  # set by `start_peer_watch` once the job is joined


def start_peer_watch(job: Job, timeout_s: int) -> None:
    """Start this process's peer watch (see the module docstring).

    At interpreter exit (before JAX's own shutdown, registered earlier) the process records that it
    exited in order, so peers still working (process 0 writing results) do not take it for dead.
    """
    global _membership
    from jax._src import distributed as jax_distributed  # the job's client; JAX exports no handle

    state = jax_distributed.global_state  # not jax.process_index(): it would create the backend now
    watch = PeerWatch(state.process_id, state.num_processes, timeout_s, time.monotonic())
    coordinator = state.coordinator_address or job.coordinator_address or "the TPU coordinator"
    _membership = _Membership(state.client, watch, state.num_processes, coordinator)
    threading.Thread(target=_membership.run, name="fgpair-peer-watch", daemon=True).start()
    atexit.register(_membership.exited_in_order)


def is_lost_peer_error(error: BaseException) -> bool:
    """Whether `error` is a collective failing because a peer process vanished (`LOST_PEER_SIGNS`)."""
    return any(sign in str(error) for sign in LOST_PEER_SIGNS)


def stop_after_failure(error: BaseException, line: Optional[str], exit_code: int) -> None:
    """End a multi-process job's process that failed with `error`; returns at once in a single process.

    Prints `line` (None: the traceback, for a bug), tells the peers (their watch ends them in one line),
    and exits with `exit_code` without JAX's shutdown, whose barrier would wait for the peers (and for
    a dead one, end in JAX's fatal message). A collective that failed because a peer vanished is not
    this process's error: the peer watch is given the time to name the lost process and end this one.
    """
    membership = _membership
    if membership is None:
        return
    if is_lost_peer_error(error):
        time.sleep(membership.watch.verdict_within_s)  # the watch thread ends the process meanwhile
    summary = line.removeprefix("error: ") if line else f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
    membership.failed(summary)
    if line is None:
        import traceback

        traceback.print_exception(error)
    else:
        print(line, file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(exit_code)
