"""Where training metrics go: a JSONL file (for tools), TensorBoard event files (for people), and the console.

TensorBoard files are written with tensorboardX, so no TensorFlow is needed. Only process 0 writes.
"""
import json
import os
import sys
import time

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from fgpair_jax.atomic_files import write_atomically


def announce(message: str) -> None:
    """A line for the person running the job (stdout): printed by process 0, logged by every process. Written
    with `tqdm.write`, so a progress bar on the terminal (stderr) is redrawn below it, not cut through."""
    logging.info(message)
    if jax.process_index() == 0:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


def phase_bar(total: int, description: str, unit: str, *, transient: bool = False) -> tqdm:
    """A progress bar (tqdm, on stderr) over a phase of `total` `unit`s, e.g. feature batches or probe fits,
    shown by process 0 (a disabled bar elsewhere). `transient`: erased when closed (a phase inside the
    training bar, such as the kNN monitor's features); otherwise it stays as the phase's record with its time.
    Use it as a context manager, calling `.update()` once per unit."""
    return tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, mininterval=1.0, leave=not transient,
                disable=jax.process_index() != 0)


def read_jsonl(path: str) -> list:
    """The entries of a metrics.jsonl file; a line cut short by a killed process is skipped."""
    entries = []
    with open(path) as f:
        for line in f:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return entries


def truncate_jsonl(path: str, resume_step: int) -> None:
    """Keep only the training lines of steps <= `resume_step` (atomically).

    Why: a run killed after its last checkpoint logged steps that the resumed run computes and logs
    again; without this the file would hold them twice (and a line cut by the kill, or the evaluation
    lines of an interrupted evaluation). TensorBoard event files are append-only and keep both.
    """
    if not os.path.exists(path):
        return
    kept = [entry for entry in read_jsonl(path)
            if entry.get("step", 0) <= resume_step and not any(k.startswith("eval/") for k in entry)]
    def write(temporary):
        with open(temporary, "w") as f:
            f.writelines(json.dumps(entry) + "\n" for entry in kept)

    write_atomically(path, write)


def summary_writer_class():
    """`tensorboardX.SummaryWriter`, imported (lazily: only process 0 needs it) without importing torch.

    tensorboardX's writer module imports torch whenever it is installed, only to accept torch tensors as
    values (tensorboardX 2.6 `writer.py`: `numpy_compatible = torch.Tensor`, in a try/except ImportError).
    This module passes Python floats, and importing torch costs seconds in every training process of an
    environment that has it (a researcher's, the tests'). When neither is imported yet, torch is hidden
    from that one import (`sys.modules["torch"] = None` makes it raise the ImportError tensorboardX
    expects) and unhidden right after, so a later `import torch` in the process works as usual. While
    hidden, an import of torch from another thread fails too, and a module first imported in that moment
    keeps its "no torch" view; tensorboardX itself still converts torch tensors (x2num imports torch
    lazily).
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends `{"step": s, **scalars}` lines to `<workdir>/metrics.jsonl` and scalars to TensorBoard."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        truncate_jsonl(self.jsonl_path, resume_step)
        self.tensorboard = summary_writer_class()(os.path.join(workdir, "tensorboard"))

    def write_scalars(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps({"step": int(step), **values}) + "\n")
        for name, value in values.items():
            self.tensorboard.add_scalar(name, value, int(step))

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()


class Progress:
    """A one-line progress bar with images/s and ETA, updated in place (tqdm), process 0 only."""

    def __init__(self, total_steps: int, start_step: int, images_per_step: int):
        self.images_per_step = images_per_step
        self.bar = None
        if jax.process_index() == 0:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="Training", unit="step", dynamic_ncols=True,
                            mininterval=2.0, smoothing=0.1)
        self._last_time, self._last_step = time.perf_counter(), start_step

    def update(self, step: int, loss: float = None):
        """Advance to `step`; returns images/s since the previous call (or since the bar started), None when
        no step has run since then (the bar starts after the step that compiled: its time is not a rate)."""
        now = time.perf_counter()
        rate = None
        if step > self._last_step:
            rate = (step - self._last_step) * self.images_per_step / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            postfix = {} if rate is None else {"img/s": f"{rate:.1f}"}
            if loss is not None:
                postfix["loss"] = f"{loss:.3f}"
            self.bar.set_postfix(postfix, refresh=False)
        return rate

    def write(self, line: str) -> None:
        """Print a line above the bar (the per-epoch summary)."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            logging.info(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
