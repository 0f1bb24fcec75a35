"""Stopping a run cleanly when the machine is being taken away (SIGTERM, orbax preemption notices) or the
person running it presses Ctrl-C (SIGINT).

Schedulers (SLURM, Kubernetes, spot VMs) send SIGTERM some seconds before they kill a job. On a single
process, `StopRequests` turns SIGTERM into a flag that the training loop reads after each step: it
saves a checkpoint and returns instead of dying mid-step. A first Ctrl-C is the same request (said at once
in one line, since a step may take a while); a second one interrupts at once, as a terminal user expects
(Python's KeyboardInterrupt, without a checkpoint of the current step). A terminal sends SIGINT to the whole
process group: grain's worker processes ignore it (`data/pipeline.py`) and are ended by the main process.
In a multi-process job every process must stop at the same step, so there the decision is left to orbax's
`reached_preemption`, which JAX's distributed runtime feeds from SIGTERM on all hosts and agrees on across
them.
"""
import os
import signal
import threading

import jax

INTERRUPT_NOTICE = ("Ctrl-C: stopping after this step with a checkpoint (press Ctrl-C again to stop at once, "
                    "without one).")


class StopRequests:
    """Context manager: while active, SIGTERM and a first SIGINT request a stop instead of ending the process.

    SIGINT is taken over only where it would raise KeyboardInterrupt (Python's default handler), so a run
    started with SIGINT ignored (`nohup`, a background job) keeps ignoring it.
    """

    def __init__(self):
        self.signal_name = None
        self._previous = {}  # signal number -> the handler to put back

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._request)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._request)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        return False

    def _request(self, signum, frame):
        if signum == signal.SIGINT:  # the next Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))
            _write_line(INTERRUPT_NOTICE)
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def reason(self, checkpointer, step: int):
        """Why the loop must stop after `step` ('SIGTERM', 'SIGINT', 'preemption'), or None to go on."""
        if self.signal_name:
            return self.signal_name
        return "preemption" if checkpointer.reached_preemption(step) else None


def _write_line(line: str) -> None:
    """`line` on standard output from a signal handler. `print` could be interrupted inside its own buffered
    write (a reentrant call raises RuntimeError); one unbuffered write to the descriptor cannot."""
    try:
        os.write(1, f"\n{line}\n".encode())
    except OSError:  # no standard output: the checkpoint is saved all the same
        pass
