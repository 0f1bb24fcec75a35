"""Checkpoints with orbax: the whole `TrainState`, the data iterator's position and a JSON fingerprint.

Why a fingerprint: resuming into a workdir written by another model or method would otherwise fail
deep inside orbax with a shape error, or worse, succeed on a coincidentally matching tree. We compare
the fingerprint first and refuse with a one-line error, touching nothing on disk.

Saves are asynchronous (training continues while orbax writes) and atomic (orbax writes to a temporary
directory and renames it when complete), so a run killed mid-save still finds its previous checkpoint.
A save that fails (a full disk, a lost mount) raises `CheckpointWriteError`, one line naming the
directory, the cause and the intact step to resume from.

Restoring walks back over every folder that stands for a step, newest first: one that does not hold a
complete checkpoint (a file cut short by a torn copy, a full disk elsewhere, bad storage; an empty folder, an
item missing; orbax's temporary folder of a save that never finished) is skipped with one line naming the step
and why; training moves it to `<directory>.damaged/`, evaluation only reads. The newest one that restores is
used. If none restores, `CheckpointReadError` says so in one line and nothing on disk is changed. A step that
is deleted while it is read (evaluation beside a training run whose `keep_checkpoints` drops old steps) is
said in one line and the walk starts again from the step that is newest then, a bounded number of times.

Layouts: format 3 (issue 24) saves a `TrainState` whose method-specific part is the method's own
`method_state`; format 2 gave every method MoCo's queue and momentum-encoder fields. A format-2 checkpoint of
a method that had that layout (moco, lcr, fgpair on moco) restores through `LegacyFormat` (its old template,
fingerprint and the conversion to today's state, `state.legacy_layout`); any other is refused in one line.

Paths: orbax reads parts of a checkpoint path as a glob pattern when it finalises a save, so under a path
holding `[...]` every save "succeeds" but no checkpoint can ever be restored (renaming the folder afterwards
does not help). Such paths are refused when the `Checkpointer` is made, before any training.
"""
import contextlib
import inspect
import os
import re
import sys
from typing import Any, Callable, NamedTuple, Optional

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from fgpair_jax import run_config
from fgpair_jax.errors import ConfigError, UserError
from fgpair_jax.metrics_writer import announce

FORMAT_VERSION = 3  # 2: the data iterator's state is saved beside the train state; 3: the method owns its state
LEGACY_FORMAT = 2  # the format `LegacyFormat` restores


class LegacyFormat(NamedTuple):
    """How a checkpoint of `LEGACY_FORMAT` restores: its expected `fingerprint`, the abstract `template` it is
    read into, and `convert` (restored legacy state -> today's state)."""
    fingerprint: dict
    template: Any
    convert: Callable[[Any], Any]
ITEM_NAMES = ("state", "meta", "data")  # the items every checkpoint of FORMAT_VERSION 2 holds
MAX_RELISTINGS = 3  # times a restore starts again when the step it reads is deleted meanwhile
TEMPORARY_MARK = ".orbax-checkpoint-tmp"  # orbax writes step N into `N.orbax-checkpoint-tmp[-<time>]`, then renames it


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written; earlier checkpoints are untouched."""


class CheckpointReadError(UserError, OSError):
    """No checkpoint (or not the step asked for) restores completely; nothing on disk was changed.
    `cause`: the storage layer's reason, at most 300 characters."""

    def __init__(self, message: str, *, cause: str = ""):
        super().__init__(message)
        self.cause = cause


class _ListingOutOfDate(Exception):
    """The step being restored was deleted, or a newer one saved, while it was read: list the steps again."""


class CheckpointMismatchError(ConfigError):
    """The checkpoint was written by another method, model or data setting; it was left untouched."""


class CheckpointPathError(ConfigError):
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


def fingerprint(config, state, format_version: int = FORMAT_VERSION) -> dict:
    """What must match for a checkpoint to be resumable: method, model, resolution, the images SSL
    trains on (all of train, or train minus a tuning split), every shape, and every other key that
    defines training (`run_config.training_fingerprint`: a changed schedule would splice two runs)."""
    shapes = {
        jax.tree_util.keystr(path): list(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state)
    }
    return {
        "format_version": format_version,
        "method": config.method,
        "model": config.model.name,
        "image_size": config.data.image_size,
        "trained_on": _trained_on(config),
        "shapes": shapes,
        "training_config": run_config.training_fingerprint(config),
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
    if extra:
        return f"the checkpoint has an unexpected {extra[0]}"
    # Checkpoints written before the training config was recorded are compared on the keys above only.
    return run_config.describe_change(saved.get("training_config", {}), expected.get("training_config", {}))


_KNOWN_WRITE_FAILURES = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                         "Permission denied")


def write_failure_cause(error: BaseException) -> str:
    """The operating system's reason inside a (long, nested) orbax/tensorstore error message."""
    text = " ".join(str(error).split())
    for phrase in _KNOWN_WRITE_FAILURES:
        if phrase in text:
            return phrase
    return text[:200] or type(error).__name__


# Reasons a read failure means the files are damaged (cut short, missing, unparsable), as tensorstore and
# orbax word them (compared without case: 'Truncated Zstd stream', 'File ... not found.'); any other failure
# (a storage hiccup, out of memory) may pass, so it moves nothing.
DAMAGE_MARKERS = ("OUT_OF_RANGE", "DATA_LOSS", "NOT_FOUND", "not found", "INVALID_ARGUMENT", "No such file",
                  "Expecting value", "JSONDecodeError", "Unterminated string", "truncated", "corrupt")


def looks_damaged(cause: str) -> bool:
    """Whether a restore's failure `cause` (`read_failure_cause`) says the checkpoint's files are damaged."""
    return any(marker.lower() in cause.lower() for marker in DAMAGE_MARKERS)


_STEP_FOLDER = re.compile(r"(\d+)(" + re.escape(TEMPORARY_MARK) + r".*)?")


def step_folders(names) -> list:
    """(step, name) of each folder name that stands for a step, newest step first (a finished folder before
    the same step's others): `123` (orbax's finished checkpoint), `123.orbax-checkpoint-tmp` (orbax's folder
    of a save in progress or killed; older orbax versions append `-<time>`) and any other spelling of the
    number (`000123`)."""
    found = [(int(match.group(1)), name) for name in names if (match := _STEP_FOLDER.fullmatch(name))]
    return sorted(found, key=lambda folder: (-folder[0], unfinished_reason(*folder) is not None, folder[1]))


def unfinished_reason(step: int, name: str) -> Optional[str]:
    """Why the folder `name` of `step` can never restore, whatever it holds; None for orbax's finished name."""
    if name == str(step):
        return None
    if TEMPORARY_MARK in name:
        return f"its save has not finished ({name} is orbax's temporary folder)"
    return f"its folder is named {name}, not {step}, so orbax never reads it"


def missing_items(step_path: str) -> Optional[str]:
    """What a step folder lacks of the `ITEM_NAMES` every checkpoint holds (absent, or an empty folder), in
    words; None when each is there, or when the folder cannot be listed (then the read failure decides).
    Why: it does not depend on how orbax words the failure of reading an incomplete step."""
    entries = _entries(step_path)
    if entries is None:
        return None
    if not entries:
        return "the step folder is empty"
    lacks = [f"no {item} item" if item not in entries else f"an empty {item} item" for item in ITEM_NAMES
             if item not in entries or not _entries(os.path.join(step_path, item))]
    return f"the step folder has {', '.join(lacks)}" if lacks else None


def _entries(path: str) -> Optional[list]:
    """The names in the folder `path`; [] for a file, None when it cannot be listed (gone, no permission)."""
    try:
        return os.listdir(path) if os.path.isdir(path) else []
    except OSError:
        return None


def damage_reason(step_path: str, cause: str) -> Optional[str]:
    """Why the step at `step_path`, whose restore failed with `cause`, is damaged: an item missing on disk,
    else `cause` when it names damage (`looks_damaged`). None: nothing says so (the storage may be at fault,
    so nothing must be moved)."""
    return missing_items(step_path) or (cause if looks_damaged(cause) else None)


def describe_deletion(step: int, gone: bool, newest: Optional[int]) -> str:
    """One line: the step being read was deleted (`gone`), or failed while step `newest` was saved, by a run
    training in the same directory; and which step is read instead."""
    what = "was deleted while it was being read" if gone else f"failed to read while step {newest} was saved"
    then = f"reading step {newest}, the newest now" if newest is not None else "no checkpoint is left"
    return (f"Checkpoint step {step} {what} (a run training in this workdir keeps only its newest "
            f"config.keep_checkpoints steps); {then}.")


def read_failure_cause(error: BaseException) -> str:
    """The innermost error of a failed restore, in at most 300 characters. orbax wraps tensorstore's short
    reason (e.g. 'OUT_OF_RANGE: Error reading "w/0" ...') in a message that prints the whole store spec."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__


class Checkpointer:
    """Keep-the-last-N orbax manager for one run directory, with fingerprint checks on restore.

    `keep`: how many of the newest checkpoints to keep; 0 or less keeps all of them (see `max_to_keep`).
    Raises `CheckpointPathError` for a directory orbax could not restore from (see `check_directory`).
    After `restore`, `restored_step` is the step actually restored (None before).
    """

    def __init__(self, directory: str, keep: int, expected_fingerprint: dict, legacy: Optional[LegacyFormat] = None):
        check_directory(directory)
        self.directory = os.path.abspath(directory)
        self.expected_fingerprint = expected_fingerprint
        self.legacy = legacy
        self.restored_step: Optional[int] = None
        self._restored_data: Optional[dict] = None  # the data position read with `restored_step`'s state
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep(keep), create=True),
            item_names=("state", "meta", "data"),
        )

    def latest_step(self) -> Optional[int]:
        """The newest saved step (None if none); `restore` may walk back from it past damaged ones."""
        return self.manager.latest_step()

    def check_compatible(self, step: int) -> Optional[LegacyFormat]:
        """Raise `CheckpointMismatchError` (one line) if the checkpoint at `step` was written by something else;
        returns `self.legacy` when it is a compatible checkpoint of `LEGACY_FORMAT`, else None."""
        saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        legacy = saved.get("format_version") == LEGACY_FORMAT and self.expected_fingerprint["format_version"] != LEGACY_FORMAT
        if legacy and self.legacy is None:  # e.g. a moco checkpoint under method simsiam: say which key differs
            problem = describe_mismatch(dict(saved, format_version=FORMAT_VERSION, shapes={}),
                                        dict(self.expected_fingerprint, shapes={})) or (
                f"it was written in checkpoint format {LEGACY_FORMAT} (before methods owned their state), which only "
                "moco, lcr and fgpair on moco read")
        else:
            problem = describe_mismatch(saved, self.legacy.fingerprint if legacy else self.expected_fingerprint)
        if problem:
            raise CheckpointMismatchError(
                f"Cannot resume from {self.directory}/{step}: {problem}. Use a new --workdir for this config "
                "(the existing checkpoint was left untouched)."
            )
        return self.legacy if legacy else None

    def restore(self, template_state, step: Optional[int] = None, *, set_aside: bool = True):
        """The state saved at `step`, laid out like `template_state` (shapes, dtypes, shardings).

        Default step: the newest that restores completely (state, data position and fingerprint). Newer step
        folders that do not (damaged, incomplete, or orbax's temporary folder of an unfinished save) are
        announced in one line each and, with `set_aside` (training; evaluation only reads), moved to
        `<directory>.damaged/`, so that the resumed run saves those steps afresh. A step deleted while it is
        read is announced and the walk restarts from the newest step then (`MAX_RELISTINGS` times). Sets
        `restored_step`, whose data state `restore_data_state()` then returns. Raises
        `CheckpointMismatchError` for another config's checkpoint and `CheckpointReadError` when nothing (or
        not the `step` asked for) restores, or when the steps keep being deleted; the disk is then untouched.
        """
        if step is None:
            step, state, data = self._restore_newest_intact(template_state, set_aside)
        else:
            state, data = self._restore_one(step, template_state)
        self.restored_step, self._restored_data = step, data
        return state

    def restore_data_state(self, step: Optional[int] = None) -> dict:
        """The data position saved with `step` (`pipeline.train_position`; grain's `get_state()` in older
        checkpoints). Default: the step `restore` restored, as read with its state (so state and data position
        always come from one checkpoint), else the latest."""
        if step is None and self.restored_step is not None:
            return self._restored_data
        if step is None:
            step = self.latest_step()
        return self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]

    def _restore_one(self, step: int, template_state):
        """(state, data position) at `step`; `CheckpointReadError` (one line) if it does not restore completely.

        The error is raised outside the `except` block, so it does not keep orbax's error (a message of
        hundreds of lines, and frames holding the reads orbax abandoned) alive as its context. The reads a
        failed restore abandons are quieted from before the first read: they can reach the hook as soon as
        the `except` block lets go of orbax's error, before the line that raises ours.
        """
        _quiet_abandoned_reads()
        try:
            return self._restore_complete(step, template_state)
        except CheckpointMismatchError:
            raise
        except Exception as error:  # orbax re-raises tensorstore's read failures as a bare Exception
            cause = read_failure_cause(error)
        raise CheckpointReadError(f"Checkpoint step {step} in {self.directory} does not restore ({cause}).",
                                  cause=cause)

    def _restore_complete(self, step: int, template_state):
        """Check the fingerprint, then read every item of `step`; returns (state, data position)."""
        legacy = self.check_compatible(step)
        if legacy is not None:  # read in the old layout, returned in today's
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, legacy.template)
        else:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template_state)
        items = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=items)
        state = legacy.convert(restored["state"]) if legacy is not None else restored["state"]
        return state, restored["data"]

    def _step_folders(self) -> list:
        """`step_folders` of the directory as it is now (finished, temporary and oddly named), newest first."""
        names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
        return step_folders(name for name in names if os.path.isdir(os.path.join(self.directory, name)))

    def _restore_newest_intact(self, template_state, set_aside: bool = True):
        """(step, state, data position) of the newest step that restores completely; newer step folders that
        do not are skipped in one line each and set aside (`set_aside`; evaluation only reads). When the step
        being read is deleted meanwhile (`_ListingOutOfDate`), that is said in one line and the directory is
        listed again, at most `MAX_RELISTINGS` times."""
        for attempt in range(MAX_RELISTINGS + 1):
            try:
                step, state, data, skipped = self._walk(self._step_folders(), template_state)
            except _ListingOutOfDate as change:
                if attempt < MAX_RELISTINGS:
                    announce(str(change))
                continue
            self._report_skipped(skipped, step, set_aside)
            return step, state, data
        raise CheckpointReadError(
            f"The checkpoint being read in {self.directory} was deleted {MAX_RELISTINGS + 1} times in a row: a run "
            "training there saves new steps faster than they can be read and deletes old ones (config."
            "keep_checkpoints). Evaluate when it has finished, or train with a larger keep_checkpoints.")

    def _walk(self, folders: list, template_state):
        """Try `folders` (`step_folders`, newest first): (step, state, data, skipped) of the first that restores
        completely, where `skipped` lists (step, folder name, why) of the newer ones that do not.

        Raises `_ListingOutOfDate` (its text: one line saying what happened) when the step being read was
        deleted, or a newer one saved, meanwhile (a run training in this directory); `CheckpointReadError`
        when a failure does not look like damage (`damage_reason`: a storage hiccup must not move a good
        checkpoint away), or when no step restores.
        """
        finished = [step for step, name in folders if unfinished_reason(step, name) is None]
        if not finished:
            raise CheckpointReadError(f"No checkpoint in {self.directory}.")
        skipped = []
        for step, name in folders:
            why = unfinished_reason(step, name)
            if why is not None:
                if step not in finished:  # a killed save of a step saved again later is no concern
                    skipped.append((step, name, why))
                continue
            try:
                state, data = self._restore_one(step, template_state)
                return step, state, data, skipped
            except CheckpointReadError as error:
                failure = error
            path = os.path.join(self.directory, name)
            newest = max((s for s, n in self._step_folders() if unfinished_reason(s, n) is None), default=None)
            if not os.path.isdir(path) or (newest is not None and newest > finished[0]):
                raise _ListingOutOfDate(describe_deletion(step, not os.path.isdir(path), newest))
            damage = damage_reason(path, failure.cause)
            if damage is None:
                raise CheckpointReadError(f"{failure} Nothing was moved; if the storage is at fault, rerun.",
                                          cause=failure.cause)
            skipped.append((step, name, f"it does not restore ({damage})"))
        newest_finished = next(why for step, _, why in skipped if step == finished[0])
        raise CheckpointReadError(
            f"No checkpoint in {self.directory} restores (tried step(s) {', '.join(map(str, finished))}; newest: "
            f"{newest_finished}). Nothing was changed; move that folder away to start afresh.",
            cause=newest_finished,
        )

    def _report_skipped(self, skipped: list, restored_step: int, set_aside: bool) -> None:
        """One line for each skipped (step, folder name, why); with `set_aside`, move each folder out of
        orbax's reach first (kept for inspection). Otherwise the resumed run would skip saving those steps
        (orbax saves no step <= its latest) and a later resume or evaluation would meet the same folders."""
        for step, name, why in skipped:
            if not set_aside:
                announce(f"Skipped checkpoint step {step}: {why}; read step {restored_step}.")
                continue
            destination = _unused_path(os.path.join(f"{self.directory}.damaged", name))
            if jax.process_index() == 0:
                os.makedirs(os.path.dirname(destination), exist_ok=True)
                os.rename(os.path.join(self.directory, name), destination)
            announce(f"Skipped checkpoint step {step}: {why}; moved it to {destination} and restored step "
                     f"{restored_step} instead.")
        if skipped and set_aside:
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("fgpair_jax: damaged checkpoints set aside")
            self.manager.reload()

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
            if not isinstance(error, OSError) and write_failure_cause(error) not in _KNOWN_WRITE_FAILURES:
                raise  # not the storage: a bug keeps its traceback
            intact = self._finished_steps()
            resume = f"step {intact[-1]} is intact and resumable" if intact else "no earlier checkpoint exists"
            raise CheckpointWriteError(
                f"Could not write a checkpoint to {self.directory} ({write_failure_cause(error)}). Free disk "
                f"space (or move --workdir to a larger disk) and rerun the same command; {resume}."
            ) from error

    def _finished_steps(self) -> list:
        """Steps whose checkpoint folder is complete on disk (orbax renames a folder only when done)."""
        return sorted(step for step, name in self._step_folders() if unfinished_reason(step, name) is None)


def _quiet_abandoned_reads() -> None:
    """From now on, drop the tracebacks of the array reads a failed orbax restore abandons (idempotent).

    When one read of a restore fails, orbax (0.12) closes its event loop with the other reads pending. Those
    then print long tracebacks whenever the garbage collector or tensorstore's threads reach them (e.g.
    mid-training, long after the one-line message): 'Exception ignored in <coroutine ...>' (orbax wraps each
    read in `except BaseException: raise Exception(...)`) and 'RuntimeError: Event loop is closed'. Only
    those two are dropped; any other unraisable exception reaches the previous hook.
    """
    if getattr(sys.unraisablehook, "drops_abandoned_orbax_reads", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_abandoned_read(unraisable):
            previous(unraisable)

    hook.drops_abandoned_orbax_reads = True
    sys.unraisablehook = hook


def _is_abandoned_read(unraisable) -> bool:
    """An orbax read coroutine closed by the collector, or a read completing into orbax's closed loop."""
    if inspect.iscoroutine(unraisable.object):
        return f"{os.sep}orbax{os.sep}" in unraisable.object.cr_code.co_filename
    return (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed")


def _unused_path(path: str) -> str:
    """`path`, or `path.2`, `path.3`, ... : the first that does not exist (a step damaged twice)."""
    candidate, number = path, 1
    while os.path.exists(candidate):
        number += 1
        candidate = f"{path}.{number}"
    return candidate
