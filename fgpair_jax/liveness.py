"""A multi-process job's liveness: a process that dies or fails ends the others, each with one line.

Why ours: JAX's coordination service notices a dead process by its heartbeats and ends the others, but
from C++ (a fatal log and a stack trace, JAX 0.10) that Python cannot intercept, and a collective may
wait for a dead peer until then (NCCL) or fail at once with a traceback (gloo, JAX's CPU collectives).
This protocol runs beside it in the job's key-value store (served by JAX's coordination service in
process 0), under `ROOT`:

- every process writes `heartbeat/<i>`, a counter bumped every `heartbeat_interval(timeout)` seconds,
  from a daemon thread (`Membership.run`);
- process 0 reads them all (`PeerWatch`): a peer whose counter has not changed for `timeout` seconds,
  and that has not written `exited/<i>` (an exit in order, e.g. after its part of the evaluation), is
  lost. Only clocks of one host are compared: a counter either changes or not;
- whoever knows why the job must end writes `verdict/<author>`, the line every process prints:
  process 0 for a lost peer, a failing process for its own error (`stop_after_failure`);
- the other processes read only `verdict/`, so process 0 serves O(number of processes) reads per
  interval; a process that sees a verdict prints it, writes `ack/<i>` and exits with `EXIT_PEER_LOST`.
  Process 0, which serves the store, waits (bounded) for the acks of the live processes before it exits.

Timing: a lost process is named within `timeout + interval` seconds (the acks add at most two
intervals), before JAX's own heartbeat timeout (`timeout + distributed.JAX_TIMEOUT_MARGIN_S`), so our
line comes first. The limit: process 0 hosts the store, and when it dies JAX 0.10's client aborts the
others within seconds from C++ (its `missed_heartbeat_callback` cannot be set from Python: the status it
passes fails to convert, `std::bad_cast`); the launchers then print the one line (`launch/README.md`).
"""
import atexit
import os
import sys
import threading
import time
import traceback
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

import jax

EXIT_PEER_LOST = 3  # a process of the job died or failed, so this one stops too
HEARTBEATS_PER_TIMEOUT = 5  # heartbeats per timeout, but at least one every `MAX_INTERVAL_S`
MAX_INTERVAL_S = 5.0  # keeps the detection well inside JAX's 30 s margin for any timeout
EXITED_WRITE_ATTEMPTS = 3  # an exit in order is recorded even through a transient store error
ROOT = "fgpair/liveness/"  # the protocol's keys in the job's key-value store: ROOT<kind>/<process index>
KINDS = ("heartbeat", "exited", "verdict", "ack")
# How gloo (JAX's CPU collectives) reports a peer that vanished; NCCL waits instead (the watch ends it).
LOST_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer")


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between two heartbeats (and two reads of the store) for a `timeout_s` heartbeat timeout."""
    return min(timeout_s / HEARTBEATS_PER_TIMEOUT, MAX_INTERVAL_S)


class PeerWatch:
    """Which processes of a job have gone silent: process 0's bookkeeping, without the I/O.

    `observe` takes each process's heartbeat counter as the store holds it now and the processes that
    exited in order, with this host's monotonic time. A peer that has not written a new counter for
    `timeout_s` seconds, and has not exited in order, is lost; one that never wrote counts from the start.
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


def parse_entries(entries: Iterable[Tuple[str, str]]) -> Dict[str, Dict[int, str]]:
    """{kind: {process index: value}} from the store's (key, value) pairs under `ROOT` (others ignored)."""
    parsed: Dict[str, Dict[int, str]] = {kind: {} for kind in KINDS}
    for key, value in entries:
        kind, _, index = key[len(ROOT):].partition("/") if key.startswith(ROOT) else ("", "", "")
        if kind in parsed and index.isdigit():
            parsed[kind][int(index)] = value
    return parsed


def lost_peer_message(lost: List[int], num_processes: int, timeout_s: float) -> str:
    """The line every surviving process prints when peers went silent."""
    names = ", ".join("0 (the coordinator)" if p == 0 else str(p) for p in lost)
    return (f"error: process{'es' if len(lost) > 1 else ''} {names} of {num_processes} went silent for "
            f"{timeout_s:g} s (killed, out of memory, or its host is gone), so this process stops too; rerun "
            f"the job to resume from the last checkpoint (FGPAIR_HEARTBEAT_TIMEOUT sets the wait).")


def failed_peer_message(process: int, num_processes: int, summary: str) -> str:
    """The line the other processes print when process `process` stopped with an error of its own."""
    return f"error: process {process} of {num_processes} stopped ({summary}), so this process stops too; see its log."


def unreachable_message(timeout_s: float, coordinator: str) -> str:
    """The line a process prints when the store (process 0) has not answered for the timeout."""
    return (f"error: process 0 (the coordinator, {coordinator}) has not answered for {timeout_s:g} s, so this "
            f"process stops; rerun the job to resume from the last checkpoint.")


def is_lost_peer_error(error: BaseException) -> bool:
    """Whether `error` is a gloo collective failing because a peer process vanished (`LOST_PEER_SIGNS`)."""
    text = str(error)
    return "Gloo" in text and any(sign in text for sign in LOST_PEER_SIGNS)


def leave_now(code: int) -> None:
    """`os._exit(code)` (no atexit handlers, so no JAX shutdown barrier waiting for peers), after
    terminating this process's `multiprocessing` children (grain's decoding workers), which `os._exit`
    would otherwise leave running."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.terminate()
    os._exit(code)


class Membership:
    """This process's side of the protocol (module docstring), over `client`, JAX's
    `DistributedRuntimeClient` (or any object with its `key_value_set` and `key_value_dir_get`).

    `clock` and `exit` are injectable for tests; `exit` must not return in production (`leave_now`).
    """

    def __init__(self, client, process_id: int, num_processes: int, timeout_s: float, coordinator: str,
                 clock: Callable[[], float] = time.monotonic, exit: Callable[[int], None] = leave_now):
        self.client, self.process_id, self.num_processes = client, process_id, num_processes
        self.timeout_s, self.coordinator, self.clock, self.exit = timeout_s, coordinator, clock, exit
        self.interval = heartbeat_interval(timeout_s)
        self.watch = PeerWatch(process_id, num_processes, timeout_s, clock()) if process_id == 0 else None
        self.stop = threading.Event()  # set when this process leaves: in order, or with its own error
        self.ending = threading.Lock()  # the first of the watch and a failing main thread ends the process
        self.beats = 0

    @property
    def verdict_within_s(self) -> float:
        """Seconds within which every process has read the verdict about a peer that died now."""
        return self.timeout_s + 2 * self.interval + 1

    def _key(self, kind: str) -> str:
        return f"{ROOT}{kind}/{self.process_id}"

    def beat(self) -> Optional[Tuple[str, Set[int]]]:
        """One heartbeat and read. Returns (line, processes not to wait for) when the job must end.
        Raises `jax.errors.JaxRuntimeError` when the store cannot be reached."""
        self.beats += 1
        self.client.key_value_set(self._key("heartbeat"), str(self.beats), allow_overwrite=True)
        if self.watch is None:
            verdicts = parse_entries(self.client.key_value_dir_get(f"{ROOT}verdict/"))["verdict"]
            return (verdicts[min(verdicts)], {min(verdicts)}) if verdicts else None
        state = parse_entries(self.client.key_value_dir_get(ROOT))
        if state["verdict"]:
            author = min(state["verdict"])
            return state["verdict"][author], {author}
        lost = self.watch.observe(state["heartbeat"], state["exited"], self.clock())
        if not lost:
            return None
        line = lost_peer_message(lost, self.num_processes, self.timeout_s)
        self.client.key_value_set(self._key("verdict"), line, allow_overwrite=True)
        return line, set(lost)

    def run(self) -> None:
        """The watch loop (a daemon thread) until `stop`: heartbeat, read, end the process on a verdict."""
        last_heard = self.clock()
        while not self.stop.wait(self.interval if self.beats else 0):
            try:
                ending = self.beat()
                last_heard = self.clock()
            except jax.errors.JaxRuntimeError:  # process 0 (the store) does not answer
                if self.clock() - last_heard <= self.timeout_s:
                    continue
                ending = (unreachable_message(self.timeout_s, self.coordinator), set())
            except Exception as error:  # a bug of ours must not end a healthy job: JAX's timeout remains
                print(f"warning: the job's liveness watch stopped ({type(error).__name__}: {error}); a lost process "
                      "now ends this one only through JAX's own heartbeat timeout.", file=sys.stderr, flush=True)
                return
            if ending is not None and not self.stop.is_set():
                self.end(*ending)

    def end(self, line: str, not_waiting_for: Set[int]) -> None:
        """Print `line`, let the others read the verdict (ack, or process 0 waits for the acks), exit 3."""
        with self.ending:
            try:
                print(line, file=sys.stderr, flush=True)
                if self.watch is None:
                    self._tell("ack", "1")
                else:
                    self._await_acks(not_waiting_for)
            finally:
                self.exit(EXIT_PEER_LOST)

    def fail(self, summary: str, report: Callable[[], None], exit_code: int) -> None:
        """This process stops with its own error: publish the verdict naming it, `report` (print the
        line or traceback), wait for the acks if this process serves the store, exit with `exit_code`."""
        with self.ending:
            try:
                self.stop.set()
                self._tell("verdict", failed_peer_message(self.process_id, self.num_processes, summary))
                report()
                if self.watch is not None:
                    self._await_acks({self.process_id})
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                self.exit(exit_code)

    def exited_in_order(self) -> None:
        """At interpreter exit: stop beating and record that this process is not lost (retried)."""
        self.stop.set()
        for _ in range(EXITED_WRITE_ATTEMPTS):
            if self._tell("exited", "1"):
                return
            time.sleep(1.0)

    def _tell(self, kind: str, value: str) -> bool:
        try:
            self.client.key_value_set(self._key(kind), value, allow_overwrite=True)
            return True
        except jax.errors.JaxRuntimeError:  # the store is gone: nobody is left to tell
            return False

    def _await_acks(self, not_waiting_for: Set[int]) -> None:
        """Process 0: keep serving the store until every live peer acknowledged the verdict (bounded)."""
        deadline = self.clock() + 2 * self.interval + 1
        while self.clock() < deadline:
            try:
                state = parse_entries(self.client.key_value_dir_get(ROOT))
            except jax.errors.JaxRuntimeError:
                return
            waiting = set(self.watch.peers) - not_waiting_for - set(state["exited"]) - set(state["ack"])
            if not waiting:
                return
            time.sleep(min(0.2, self.interval))


_membership: Optional[Membership] = None  # this process's, once `start` joined it to a job


def start(timeout_s: int, coordinator: Optional[str]) -> None:
    """Start this process's side of the protocol; call once `jax.distributed.initialize` returned.

    Registers the exit-in-order record with `atexit` after JAX's own shutdown handler (registered at
    `import jax`), so it runs first, while the store still serves.
    """
    global _membership
    from jax._src import distributed as jax_distributed  # the job's client; JAX exports no handle

    state = jax_distributed.global_state  # not jax.process_index(): it would create the backend now
    _membership = Membership(state.client, state.process_id, state.num_processes, timeout_s,
                             state.coordinator_address or coordinator or "the TPU coordinator")
    threading.Thread(target=_membership.run, name="fgpair-liveness", daemon=True).start()
    atexit.register(_membership.exited_in_order)


def stop_after_failure(error: BaseException, line: Optional[str], exit_code: int) -> None:
    """End a multi-process job's process that failed with `error`; returns at once outside a job.

    Prints `line` (None: the traceback, for a bug), names this process to the others (they stop at once
    with one line) and exits with `exit_code` without JAX's shutdown, whose barrier would wait for the
    peers. A gloo collective that failed because a peer vanished is not this process's error: the watch
    is given the time to hear the verdict naming the lost process, and ends this one with it.
    """
    membership = _membership
    if membership is None:
        return
    if is_lost_peer_error(error):
        time.sleep(membership.verdict_within_s)  # the watch thread ends the process meanwhile
    summary = line.removeprefix("error: ") if line else f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"

    def report():
        if line is None:
            traceback.print_exception(error)
        else:
            print(line, file=sys.stderr)

    membership.fail(summary, report, exit_code)
