"""The liveness protocol of a multi-process job (fgpair_jax/liveness.py) over a fake key-value store.

The real runs (kill -9, a process failing alone, a killed coordinator) are in test_multiprocess.py;
here each rule is checked on its own, with an injected clock and exit.
"""
import jax
import pytest

from fgpair_jax import liveness
from fgpair_jax.liveness import ROOT, Membership, PeerWatch


class Store:
    """JAX's `DistributedRuntimeClient` key-value calls over a dict shared by the "processes"."""

    def __init__(self):
        self.data, self.down = {}, False

    def key_value_set(self, key, value, allow_overwrite=False):
        self._check()
        self.data[key] = value

    def key_value_dir_get(self, directory):
        self._check()
        return sorted((k, v) for k, v in self.data.items() if k.startswith(directory))

    def _check(self):
        if self.down:
            raise jax.errors.JaxRuntimeError("UNAVAILABLE: Socket closed")


class Exited(Exception):
    pass


def leave(code):
    raise Exited(code)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def member(store, clock, process, processes=3, timeout=10.0):
    return Membership(store, process, processes, timeout, "127.0.0.1:1", clock=clock, exit=leave)


def test_the_peer_watch_finds_silent_peers_by_their_counters_not_their_clocks():
    watch = PeerWatch(process_id=0, num_processes=3, timeout_s=10, now=100.0)
    assert watch.observe({0: "1", 1: "1", 2: "1"}, exited=[], now=101.0) == []
    assert watch.observe({0: "2", 1: "2", 2: "1"}, exited=[], now=109.0) == []  # 2 silent for 8 s
    assert watch.observe({0: "3", 1: "3", 2: "1"}, exited=[], now=111.5) == [2]  # 10.5 s: lost
    assert watch.observe({0: "4", 1: "3", 2: "1"}, exited=[2], now=111.6) == []  # 2 had exited in order
    late = PeerWatch(process_id=0, num_processes=2, timeout_s=10, now=0.0)
    assert late.observe({0: "1"}, exited=[], now=10.5) == [1]  # a peer that never wrote counts from the start


@pytest.mark.parametrize("timeout,interval", [(10, 2.0), (100, 5.0), (600, 5.0)])
def test_a_lost_process_is_named_before_jax_s_own_timeout_for_any_timeout(timeout, interval):
    from fgpair_jax.distributed import JAX_TIMEOUT_MARGIN_S

    assert liveness.heartbeat_interval(timeout) == interval
    # named within timeout + interval, every process has read it two intervals (and a second) later
    assert member(Store(), Clock(), 1, timeout=timeout).verdict_within_s < timeout + JAX_TIMEOUT_MARGIN_S


def test_process_0_names_a_silent_peer_and_waits_for_the_others_to_read_it(capsys):
    store, clock = Store(), Clock()
    coordinator, alive, dead = (member(store, clock, p) for p in range(3))
    for step in range(7):  # 12 s: process 2 never beats after the start
        clock.now = 2.0 * step
        if step == 0:
            dead.beat()
        assert alive.beat() is None
        ending = coordinator.beat()
        if ending:
            break
    line, not_waiting_for = ending
    assert line.startswith("error: process 2 of 3 went silent for 10 s") and not_waiting_for == {2}
    assert alive.beat() == (line, {0})  # the others read process 0's verdict
    with pytest.raises(Exited, match="3"):
        alive.end(*alive.beat())
    assert store.data[f"{ROOT}ack/1"] == "1"
    with pytest.raises(Exited, match=str(liveness.EXIT_PEER_LOST)):
        coordinator.end(line, not_waiting_for)  # process 1 acknowledged: no wait
    assert capsys.readouterr().err.count("went silent") == 2


def test_a_process_that_exited_in_order_is_not_taken_for_lost():
    store, clock = Store(), Clock()
    coordinator, finished = member(store, clock, 0, processes=2), member(store, clock, 1, processes=2)
    finished.beat()
    finished.exited_in_order()
    assert finished.stop.is_set()
    clock.now = 60.0  # process 0 writes figures for a minute alone
    assert coordinator.beat() is None


def test_a_failing_process_names_itself_to_the_others(capsys):
    store, clock = Store(), Clock()
    coordinator, failing = member(store, clock, 0, processes=2), member(store, clock, 1, processes=2)
    with pytest.raises(Exited, match="2"):
        failing.fail("bad batch", lambda: print("error: bad batch"), 2)
    assert failing.stop.is_set()
    line, _ = coordinator.beat()
    assert line == "error: process 1 of 2 stopped (bad batch), so this process stops too; see its log."
    assert capsys.readouterr().out == "error: bad batch\n"


def test_an_unreachable_coordinator_ends_a_process_after_the_timeout_only(capsys):
    store, clock = Store(), Clock()
    process = member(store, clock, 1, processes=2, timeout=1.0)  # interval 0.2 s of real time
    store.down = True

    def tick(_):
        clock.now += 0.3
        return process.stop.is_set()

    process.stop.wait = tick  # each wait advances the fake clock by 0.3 s
    with pytest.raises(Exited, match="3"):
        process.run()
    assert clock.now > 1.0
    assert capsys.readouterr().err.startswith("error: process 0 (the coordinator, 127.0.0.1:1) has not answered for 1 s")


def test_a_bug_in_the_watch_stops_the_watch_not_the_job(capsys):
    class Broken(Store):
        def key_value_set(self, key, value):  # no allow_overwrite: a TypeError, not a store error
            pass

    process = member(Broken(), Clock(), 1, processes=2)
    process.run()  # returns: no exit
    assert "warning: the job's liveness watch stopped (TypeError" in capsys.readouterr().err


def test_the_lines_name_who_stopped_and_what_to_do():
    line = liveness.lost_peer_message([0, 3], 4, 100)
    assert line.startswith("error: processes 0 (the coordinator), 3 of 4 went silent for 100 s")
    assert "rerun the job to resume" in line and "FGPAIR_HEARTBEAT_TIMEOUT" in line and "\n" not in line


@pytest.mark.parametrize("text,lost", [
    ("UNKNOWN: Gloo all-reduce failed: [gloo/transport/tcp/pair.cc:547] Connection closed by peer [127.0.0.1]:1", True),
    ("UNKNOWN: Gloo all-gather failed: Connection reset by peer", True),
    ("[Errno 32] Broken pipe", False),  # a dead `tee`, not a peer
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8 bytes", False),
])
def test_a_collective_that_lost_its_peer_is_told_from_other_errors(text, lost):
    assert liveness.is_lost_peer_error(ValueError(text)) is lost


def test_outside_a_job_a_failure_is_left_to_the_command_line():
    assert liveness._membership is None  # this test process joined no job
    liveness.stop_after_failure(ValueError("Gloo: Connection closed by peer"), "error: x", 2)  # returns


def test_leaving_at_once_takes_the_data_workers_along(tmp_path):
    """`leave_now` skips atexit (JAX's shutdown barrier would wait for the peers), which is also where
    multiprocessing stops its children: grain's workers must not outlive the process."""
    import os
    import subprocess
    import sys
    import time

    from conftest import REPO

    script = ("import multiprocessing, time, sys\n"
              "from fgpair_jax import liveness\n"
              "if __name__ == '__main__':\n"
              "    child = multiprocessing.Process(target=time.sleep, args=(120,)); child.start()\n"
              "    print(child.pid, flush=True)\n"
              "    liveness.leave_now(3)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    child = int(done.stdout.split()[0])
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{child}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":  # a zombie: ended, waiting to be reaped
                break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        raise AssertionError("the worker outlived the process")
