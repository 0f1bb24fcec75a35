"""Checkpoints with orbax: the whole `TrainState`, the data iterator's position and a JSON fingerprint.

Why a fingerprint: resuming into a workdir written by another model or method would otherwise fail
deep inside orbax with a shape error, or worse, succeed on a coincidentally matching tree. We compare
the fingerprint first and refuse with a one-line error, touching nothing on disk.

Saves are asynchronous (training continues while orbax writes) and atomic (orbax writes to a temporary
directory and renames it when complete), so a run killed mid-save still finds its previous checkpoint.
A save that fails (a full disk, a lost mount) raises `CheckpointWriteError`, one line naming the
directory, the cause and the intact step to resume from.

Paths: orbax reads parts of a checkpoint path as a glob pattern when it finalises a save, so under a path
holding `[...]` every save "succeeds" but no checkpoint can ever be restored (renaming the folder afterwards
does not help). Such paths are refused when the `Checkpointer` is made, before any training.
"""
import contextlib
import os
from typing import Optional

import jax
import orbax.checkpoint as ocp

FORMAT_VERSION = 2  # 2: the data iterator's state is saved beside the train state


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; earlier checkpoints are untouched."""


class CheckpointPathError(ValueError):
    """The checkpoint directory's path cannot hold restorable orbax checkpoints."""


GLOB_CHARACTERS = "[]*?"


def check_directory(directory: str) -> None:
    """Raise `CheckpointPathError` (one line) if orbax could not restore checkpoints saved under `directory`.

    Why: orbax globs `<step dir>/ocdbt.process_*` to merge a save's files; a path holding `[0.03]` is then a
    character class that does not match itself, the merge is skipped with only a WARNING, and every later
    restore fails with NOT_FOUND. `*` and `?` do match themselves but can also match a sibling run's
    folders, so they are refused too.
    """
    path = os.path.abspath(directory)
    found = [character for character in GLOB_CHARACTERS if character in path]
    if found:
        raise CheckpointPathError(
            f"Cannot keep checkpoints in {path!r}: it contains {' '.join(found)}, which orbax reads as a glob "
            "pattern, so no checkpoint saved there could ever be restored. Choose a --workdir without "
            f"{' '.join(GLOB_CHARACTERS)} (e.g. lr0.03 or lr_0.03 instead of lr[0.03])."
        )


def max_to_keep(keep: int) -> Optional[int]:
    """orbax's `max_to_keep` for `config.keep_checkpoints`: the `keep` newest checkpoints when `keep` >= 1;
    0 or less keeps every checkpoint (TensorFlow's convention). orbax itself would delete every checkpoint,
    the newest included, at 0, and reject negative values."""
    return keep if keep >= 1 else None


def fingerprint(config, state) -> dict:
    """What must match for a checkpoint to be resumable: method, model, resolution, the images SSL
    trains on (all of train, or train minus a tuning split) and every shape."""
    shapes = {
        jax.tree_util.keystr(path): list(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state)
    }
    return {
        "format_version": FORMAT_VERSION,
        "method": config.method,
        "model": config.model.name,
        "image_size": config.data.image_size,
        "trained_on": _trained_on(config),
        "shapes": shapes,
    }


ALL_OF_TRAIN = "all of train"


def _trained_on(config) -> str:
    """Which images SSL trains on: a run tuned on a held-out part of train must not resume as a final run."""
    if config.data.eval_split == "val":
        return f"train minus a {config.data.val_fraction} validation part"
    return ALL_OF_TRAIN


def describe_mismatch(saved: dict, expected: dict) -> Optional[str]:
    """The first difference between two fingerprints in words, or None when they agree."""
    defaults = {"trained_on": ALL_OF_TRAIN}  # fingerprints written before the key existed
    for key in ("format_version", "method", "model", "image_size", "trained_on"):
        was, now = saved.get(key, defaults.get(key)), expected.get(key, defaults.get(key))
        if was != now:
            return f"{key} is {was!r} in the checkpoint but {now!r} in the config"
    saved_shapes, expected_shapes = saved.get("shapes", {}), expected["shapes"]
    for name, shape in expected_shapes.items():
        if name not in saved_shapes:
            return f"the checkpoint has no {name}"
        if saved_shapes[name] != shape:
            return f"{name} has shape {saved_shapes[name]} in the checkpoint but {shape} in the model"
    extra = sorted(set(saved_shapes) - set(expected_shapes))
    return f"the checkpoint has an unexpected {extra[0]}" if extra else None


_KNOWN_WRITE_FAILURES = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                         "Permission denied")


def write_failure_cause(error: BaseException) -> str:
    """The operating system's reason inside a (long, nested) orbax/tensorstore error message."""
    text = " ".join(str(error).split())
    for phrase in _KNOWN_WRITE_FAILURES:
        if phrase in text:
            return phrase
    return text[:200] or type(error).__name__


class Checkpointer:
    """Keep-the-last-N orbax manager for one run directory, with fingerprint checks on restore.

    `keep`: how many of the newest checkpoints to keep; 0 or less keeps all of them (see `max_to_keep`).
    Raises `CheckpointPathError` for a directory orbax could not restore from (see `check_directory`).
    """

    def __init__(self, directory: str, keep: int, expected_fingerprint: dict):
        check_directory(directory)
        self.directory = os.path.abspath(directory)
        self.expected_fingerprint = expected_fingerprint
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep(keep), create=True),
            item_names=("state", "meta", "data"),
        )

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def check_compatible(self, step: int) -> None:
        """Raise a one-line error if the checkpoint at `step` was written by something else."""
        saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        problem = describe_mismatch(saved, self.expected_fingerprint)
        if problem:
            raise ValueError(
                f"Cannot resume from {self.directory}/{step}: {problem}. Use a new --workdir for this config "
                "(the existing checkpoint was left untouched)."
            )

    def restore(self, template_state, step: Optional[int] = None):
        """The state saved at `step` (default: latest), laid out like `template_state` (shapes + shardings)."""
        step = self.latest_step() if step is None else step
        self.check_compatible(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return restored["state"]

    def restore_data_state(self, step: Optional[int] = None) -> dict:
        """The data iterator state saved with `step` (default: latest): grain's `get_state()` dict."""
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
        """Start an asynchronous save of `state` and the iterator's `data_state` as `step` (no-op if that
        step is already saved). An error of this or of the previous asynchronous save is raised here."""
        if step in self.manager.all_steps():
            return False
        with self._write_errors_as(step):
            return self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    meta=ocp.args.JsonSave(self.expected_fingerprint),
                    data=ocp.args.JsonSave(data_state),
                ),
                force=force,
            )

    def reached_preemption(self, step: int) -> bool:
        """True on every host once any host got a preemption notice (TPU/Cloud); save and exit then."""
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        """Wait for pending asynchronous saves, then release the manager. Call before exiting."""
        try:
            with self._write_errors_as(None):
                self.manager.wait_until_finished()
        finally:
            self.manager.close()

    @contextlib.contextmanager
    def _write_errors_as(self, step: Optional[int]):
        """Turn orbax's write failures into one line. An asynchronous save fails in orbax's background
        thread and is re-raised by the next `save` or by `close`, so the failed step may be an earlier one."""
        try:
            yield
        except (OSError, ValueError, RuntimeError) as error:
            intact = self._finished_steps()
            resume = f"step {intact[-1]} is intact and resumable" if intact else "no earlier checkpoint exists"
            raise CheckpointWriteError(
                f"Could not write a checkpoint to {self.directory} ({write_failure_cause(error)}). Free disk "
                f"space (or move --workdir to a larger disk) and rerun the same command; {resume}."
            ) from error

    def _finished_steps(self) -> list:
        """Steps whose checkpoint folder is complete on disk (orbax renames a folder only when done)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(name) for name in os.listdir(self.directory) if name.isdigit())
