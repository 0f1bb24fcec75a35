"""Stopping a run cleanly when the machine is being taken away: SIGTERM and orbax preemption notices.

Schedulers (SLURM, Kubernetes, spot VMs) send SIGTERM some seconds before they kill a job. On a single
process, `StopRequests` turns SIGTERM into a flag that the training loop reads after each step: it
saves a checkpoint and returns instead of dying mid-step. In a multi-process job every process must
stop at the same step, so there the decision is left to orbax's `reached_preemption`, which JAX's
distributed runtime feeds from SIGTERM on all hosts and agrees on across them.
"""
import signal
import threading

import jax


class StopRequests:
    """Context manager: while active, SIGTERM requests a stop instead of terminating the process."""

    def __init__(self):
        self.signal_name = None
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._request)
        return self

    def __exit__(self, *exc_info):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        return False

    def _request(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def reason(self, checkpointer, step: int):
        """Why the loop must stop after `step` ('SIGTERM', 'preemption'), or None to go on."""
        if self.signal_name:
            return self.signal_name
        return "preemption" if checkpointer.reached_preemption(step) else None
