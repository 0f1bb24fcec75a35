"""`python -m fgpair_jax.main`, instrumented for tests/test_multiprocess.py: one process of a job.

Run as a script (`python tests/multiprocess_worker.py --config=... --workdir=...`), alone or as each of
the processes `launch/local.sh` starts. On top of the real command line it
- records the train batches this process reads: one JSON line {"process", "step", "index"} per batch in
  `$FGPAIR_TEST_RECORD/batches.<process index>.jsonl`, so the test can check who read what;
- with `FGPAIR_TEST_SIGNAL=<process>:<step>:<signal name>`, sends that signal to itself when process
  <process> draws the batch of step <step>: a SIGTERM or kill -9 at a known step, not a timed guess;
  the name `DataError` raises that user error there instead (one process failing alone).
"""
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fgpair_jax import cli, main, train  # noqa: E402


def planned_signal():
    """(process, step, signal) from FGPAIR_TEST_SIGNAL, or None."""
    spec = os.environ.get("FGPAIR_TEST_SIGNAL")
    if not spec:
        return None
    process, step, name = spec.split(":")
    return int(process), int(step), (name if name == "DataError" else signal.Signals[name])


class RecordedBatches:
    """The train batch iterator, writing each batch's record indices (and sending the planned signal)."""

    def __init__(self, batches, start_step: int):
        import jax

        self.batches, self.step, self.process = batches, start_step, jax.process_index()
        directory = os.environ["FGPAIR_TEST_RECORD"]
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"batches.{self.process}.jsonl")
        self.signal = planned_signal()

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        self.step += 1
        with open(self.path, "a") as f:
            f.write(json.dumps({"process": self.process, "step": self.step,
                                "index": batch["index"].tolist()}) + "\n")
        if self.signal and self.signal[:2] == (self.process, self.step):
            if self.signal[2] == "DataError":
                from fgpair_jax.errors import DataError

                raise DataError(f"a bad batch planted by the test at step {self.step}")
            os.kill(os.getpid(), self.signal[2])
        return batch

    def close(self):
        self.batches.close()


def recorded_host_batches(host_batches):
    def wrapped(config, source, start_step=0):
        return RecordedBatches(host_batches(config, source, start_step), start_step)
    return wrapped


if __name__ == "__main__":
    train._host_batches = recorded_host_batches(train._host_batches)
    main.define_flags()
    cli.run(main.main)
