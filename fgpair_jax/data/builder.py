"""The one TFDS builder every data set shares: a reader's `DataIndex` in, an ArrayRecord build out.

A data set is a reader (`cub.py`, `cars.py`, `aircraft.py`, `image_folder.py`) that lists its images as
`records.ImageRecord`s; this module finds the files, checks and converts the images (`images.py`), keys and
locks the build, and opens it as random-access sources.

Why a builder of our own: TFDS's built-in `caltech_birds2011` and `cars196` download archives (the latter's
addresses are dead) and need TensorFlow to prepare; none reads a folder that is already on disk. Why
ArrayRecord: it is the only file format TFDS writes and reads without TensorFlow, and it gives random
access, which grain's index-based shuffling and checkpointing need.

Identity of a build (`build_key`): a SHA-256 over what it is built from: the data set, its label set, every
record (file name, label, split, box) and every listed file's size and modification time (`os.stat`, not its
bytes: cheap for 16k images). Images replaced in place, a changed copy of a folder built into the same data
dir, another split or another subset are therefore builds of their own, never a stale reuse; the same folder
moved (`mv` keeps the times) reuses its build, a plain copy (`cp` without `-p`) builds again. Smaller stored
copies (`stored_short_side`: `images.stored_size`) are part of the key too. The build lives in
`<data_dir>/fgpair_folder/<data set>_classes<C>_<key>[_max<N>px][_short<S>px]/<version>/`; older builds of a
changed folder stay beside it until removed by hand.

Skips: a listed file that cannot be stored is skipped and reported as what it is, one warning per split and
reason (`images.SKIP_REASONS`), and recorded in the build's metadata. A split with no readable image at all
is a one-line error. Before the first image is decoded, the build checks what it can know: each split has at
least one listed file on disk, and the disk has at least as much free space as those files take.

Concurrent first runs (the hosts of a multi-host job, or several runs sharing $TFDS_DATA_DIR): TFDS builds
into a temporary folder and renames it when done, and a second build of the same folder fails at that rename.
So a build is made under an exclusive lock on a file beside it (`build_lock`): the first process builds, the
others wait and then reuse the finished build. The lock is `fcntl.flock`, released by the kernel when its
holder exits (a killed builder leaves no stale lock); hosts sharing the folder over NFS need a working lock
service (Linux clients map flock onto NFS byte-range locks). A builder killed outright (`kill -9`) leaves TFDS's
temporary folder (`<config name>/incomplete.<random>_<version>`): the next process to hold the lock removes
it, saying so in one line.

Full disk: a build the storage refuses (no space, quota, read-only, data_dir not a writable folder) is one
line (`DataWriteError`) naming data_dir, the reason and the fix, like a checkpoint that cannot be written;
TFDS removes its temporary folder, so nothing half-built is left and the next build starts afresh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants as tfds_constants

from fgpair_jax.data import images, jpeg, locks, records
from fgpair_jax.data.images import MISSING, SKIP_REASONS, TOO_LARGE, UnreadableImage
from fgpair_jax.data.records import SPLITS
from fgpair_jax.errors import DataError, DataWriteError, UserError

_LOG = logging.getLogger(__name__)

_KEY_HEX_DIGITS = 10
_SKIPPED_NAMES_SHOWN = 5


@dataclasses.dataclass(frozen=True)
class Located:
    """Where each record of an index is on disk (`images.find_image`; None: missing), aligned with
    `index.records`, and for missing names spelt on disk in another letter case, that spelling (a hint)."""

    paths: tuple[str | None, ...]
    other_case: Mapping[str, str]


def locate(index: records.DataIndex) -> Located:
    """Finds every listed file once (one `images.FolderListing` for the whole index)."""
    listing = images.FolderListing()
    paths = tuple(images.find_image(index.images_dir, record.file_name, listing) for record in index.records)
    other_case = {}
    for record, path in zip(index.records, paths):
        if path is None:
            on_disk = listing.other_case(index.images_dir, record.file_name)
            if on_disk is not None:
                other_case[record.file_name] = on_disk
    return Located(paths, other_case)


def build_key(data_set: str, index: records.DataIndex, paths: Sequence[str | None], stored_short_side: int = 0) -> str:
    """Short content key of what a build is made from (see the module docstring): the records, the label
    set, each listed file's (size, mtime_ns) (a missing file counts as missing) and, when not 0, the
    shorter side images are stored at."""
    digest = hashlib.sha256()
    digest.update(json.dumps([data_set, list(index.class_names), list(index.class_ids)]).encode())
    if stored_short_side:  # 0 hashes as before it existed: earlier builds keep their key
        digest.update(json.dumps(["stored_short_side", int(stored_short_side)]).encode())
    for record, path in zip(index.records, paths):
        stat = None
        if path is not None:
            with contextlib.suppress(OSError):
                found = os.stat(path)
                stat = [found.st_size, found.st_mtime_ns]
        row = [record.image_id, record.file_name, record.label, record.split,
               None if record.box is None else [float(v) for v in record.box], stat]
        digest.update(json.dumps(row).encode() + b"\n")
    return digest.hexdigest()[:_KEY_HEX_DIGITS]


class FolderBuildConfig(tfds.core.BuilderConfig):
    """A build of one data set's folder: its index, where its files are, its key, and the pixel limit it was
    built with (a raised `max_image_pixels` keeps images a default build skips, so it names a build of its
    own: `<data set>_classes<C>_<key>_max<N>px`), and the shorter side it stores images at (0: as they are;
    else `..._short<S>px`, with S in the key)."""

    def __init__(self, *, data_set: str, index: records.DataIndex, located: Located, key: str,
                 max_image_pixels: int | None = None, stored_short_side: int = 0):
        limit = "" if max_image_pixels is None else f"_max{max_image_pixels}px"
        limit += f"_short{stored_short_side}px" if stored_short_side else ""
        num_classes = len(index.class_names)
        super().__init__(
            name=f"{data_set}_classes{num_classes}_{key}{limit}",
            description=f"{index.data_set} with {num_classes} classes, build key {key}.",
        )
        self.data_set = data_set
        self.index = index
        self.located = located
        self.key = key
        self.max_image_pixels = max_image_pixels
        self.stored_short_side = stored_short_side

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.index.class_names

    @property
    def class_ids(self) -> tuple[int, ...]:
        return self.index.class_ids


class FolderBuild(tfds.core.GeneratorBasedBuilder):
    """Any registered data set, read from a local folder by its reader (`FolderBuildConfig`).

    Use `load_sources` rather than this class: it reads the index, keys the build and holds its lock.
    """

    name = "fgpair_folder"
    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release (as cub_folder): reads an extracted CUB_200_2011/ folder.",
        "1.1.0": "Names matched across Unicode normal forms; skips recorded by reason (missing, undecodable, "
                 "too large); images above Pillow's pixel limit stored downscaled.",
        "2.0.0": "One builder for every data set's reader; builds keyed by the records and the files' sizes and "
                 "times; bounding boxes stored.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Set config.data.manual_dir to the data set's folder (see README: Data sets)."

    def _create_builder_config(self, builder_config, version):
        """TFDS's, without its WARNING that the config is not one of the class's: every build of ours is such a
        custom config, and the builder is made again in every grain worker that unpickles a data source."""
        with _without_absl_messages(_CUSTOM_CONFIG_MESSAGE):
            return super()._create_builder_config(builder_config, version)

    def _log_download_bytes(self) -> None:
        """TFDS's line before a build ('Downloading and preparing dataset Unknown size ...': wrong for a local
        folder) replaced by ours, printed once, by the process that builds."""
        config = self.builder_config
        print(f"Building {config.index.data_set} ({len(config.index.records):,} images listed) into {self.data_dir}; "
              "later runs reuse it.", flush=True)

    def _log_download_done(self) -> None:
        """Nothing: the run's `Data: ... (built now)` line (`sources.build_line`) says where the build is."""

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        if not isinstance(config, FolderBuildConfig):
            raise ValueError("FolderBuild needs a FolderBuildConfig: use fgpair_jax.data.builder.load_sources.")
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{config.index.data_set} read from a local folder; labels are its classes in order.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=config.class_names),
                    "class_id": tfds.features.Scalar(dtype=np.int32, doc="the data set's own class id"),
                    "image_id": tfds.features.Scalar(dtype=np.int64, doc="the data set's own image id"),
                    "file_name": tfds.features.Text(doc="path as the index lists it"),
                    "box": tfds.features.Tensor(shape=(4,), dtype=np.float32,
                                                doc="x_min, y_min, x_max, y_max in stored pixels; the whole "
                                                    "image where the data set has no box"),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """Everything knowable before the first image is decoded is checked here: the files unchanged since
        the key was computed, each split's images on disk (at least one), the room to store them."""
        config = self.builder_config
        index, located = config.index, config.located
        key = build_key(config.data_set, index, located.paths, config.stored_short_side)
        if key != config.key:
            raise DataError(
                f"{index.data_set} {index.manual_dir!r}: its files changed while the build was starting (key "
                f"{config.key}, now {key}); nothing was built. Let whatever is editing the folder finish, then rerun."
            )
        for split in SPLITS:
            listed = [(record.file_name, path) for record, path in zip(index.records, located.paths)
                      if record.split == split]
            if not listed:
                raise DataError(f"{index.data_set} {index.manual_dir!r}: {index.listed_in} leaves the {split} "
                                f"split empty; {index.expected_layout}.")
            if all(path is None for _, path in listed):
                raise _nothing_readable_error(index, split, {MISSING: [name for name, _ in listed]},
                                              located.other_case)
        _check_room(self.data_dir, located.paths)
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        """The split's examples, in the index's order."""
        config = self.builder_config
        index, located = config.index, config.located
        skipped: list[tuple[str, str]] = []  # (file name, reason), in index order
        downscaled: list[str] = []
        for record, path in zip(index.records, located.paths):
            if record.split != split:
                continue
            try:
                if path is None:
                    raise UnreadableImage(MISSING)
                stored = images.load_rgb_jpeg(path, config.max_image_pixels, config.stored_short_side)
            except UnreadableImage as problem:
                skipped.append((record.file_name, problem.reason))
                continue
            if stored.downscaled:
                downscaled.append(record.file_name)
            yield record.image_id, {
                "image": stored.data,
                "label": record.label,
                "class_id": index.class_ids[record.label],
                "image_id": record.image_id,
                "file_name": record.file_name,
                "box": _stored_box(record.box, stored),
            }
        self._record_and_report(split, skipped, downscaled)

    def _record_and_report(self, split: str, skipped: list, downscaled: list) -> None:
        """Keeps the skipped and downscaled names in the build's metadata and warns once per split and reason;
        a split of which nothing could be stored is a one-line error."""
        config = self.builder_config
        index = config.index
        every_skip = [name for name, _ in skipped]
        by_reason = {reason: [name for name, why in skipped if why == reason] for reason in SKIP_REASONS}
        by_reason = {reason: names for reason, names in by_reason.items() if names}
        self.info.metadata[f"skipped_{split}"] = every_skip
        self.info.metadata[f"skipped_{split}_by_reason"] = by_reason
        self.info.metadata[f"downscaled_{split}"] = downscaled
        self.info.metadata["has_boxes"] = index.has_boxes
        self.info.metadata["data_set"] = config.data_set
        if every_skip and len(every_skip) == sum(record.split == split for record in index.records):
            # Otherwise TFDS fails with a bare 'No examples were yielded' assertion.
            raise _nothing_readable_error(index, split, by_reason, config.located.other_case)
        for reason, names in by_reason.items():
            _LOG.warning("%s %s split: skipped %d %s images: %s%s", index.data_set, split, len(names), reason,
                         ", ".join(names[:_SKIPPED_NAMES_SHOWN]), _hint(reason, names, config.located.other_case, index.listed_in))
        if downscaled:
            _LOG.warning("%s %s split: stored %d images downscaled to %d pixels (Pillow's limit, so that every "
                         "reader decodes them): %s", index.data_set, split, len(downscaled), images.STORED_MAX_PIXELS,
                         ", ".join(downscaled[:_SKIPPED_NAMES_SHOWN]))


def _stored_box(box: records.Box | None, stored: images.StoredJpeg) -> np.ndarray:
    """`box` (original pixels) in the stored image's pixels, clipped to it; the whole image for None."""
    if box is None:
        return np.array([0.0, 0.0, stored.width, stored.height], np.float32)
    scaled = np.asarray(box, np.float64) * stored.scale
    limits = np.array([stored.width, stored.height, stored.width, stored.height], np.float64)
    return np.clip(scaled, 0.0, limits).astype(np.float32)


_HINTS = {
    TOO_LARGE: " (more pixels than Pillow's decompression-bomb limit or config.data.max_image_pixels; raise "
               "config.data.max_image_pixels to keep them)",
}


def _hint(reason: str, names: Sequence[str], other_case: Mapping[str, str], listed_in: str = "the index") -> str:
    """What to add to a count of `names` skipped for `reason`: its fix, or for missing names spelt on disk in
    another letter case ('.JPG' for '.jpg'; see `FolderListing.other_case`) how many and one example."""
    if reason != MISSING:
        return _HINTS.get(reason, "")
    found = [name for name in names if name in other_case]
    if not found:
        return ""
    verb = "is" if len(found) == 1 else "are"
    return (f" ({len(found)} of them {verb} on disk in another letter case, e.g. {other_case[found[0]]!r} for "
            f"{found[0]!r}: correct {listed_in} or rename the files)")


def _nothing_readable_error(index: records.DataIndex, split: str, by_reason: Mapping[str, Sequence[str]],
                            other_case: Mapping[str, str]) -> DataError:
    """No image of `split` can be stored: one line with the count per reason (`by_reason`, non-empty) and the
    hint of the most common one."""
    names = [name for reason_names in by_reason.values() for name in reason_names]
    counts = ", ".join(f"{len(reason_names)} {reason}" for reason, reason_names in by_reason.items())
    main_reason = max(by_reason, key=lambda reason: len(by_reason[reason]))
    images_dir = os.path.relpath(index.images_dir, index.manual_dir)
    return DataError(
        f"{index.data_set} {index.manual_dir!r}: none of the {len(names)} {split} images listed in "
        f"{index.listed_in} could be read from {images_dir}/ ({counts}, e.g. {names[0]!r})"
        f"{_hint(main_reason, by_reason[main_reason], other_case, index.listed_in)}; {index.expected_layout}."
    )


def _check_room(build_dir: str, paths: Sequence[str | None]) -> None:
    """OSError(ENOSPC) before anything is decoded if the disk of `build_dir` has less free space than the
    images to store take (a lower bound of the build's size: valid RGB JPEGs are stored byte for byte)."""
    needed = 0
    for path in paths:
        if path is not None:
            with contextlib.suppress(OSError):
                needed += os.stat(path).st_size
    free = shutil.disk_usage(build_dir).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"not enough free space: the images to store take {_size(needed)}, "
                                    f"{_size(free)} are free")


def _size(num_bytes: int) -> str:
    """'100 bytes', '3.2 kB', '1.1 GB'."""
    if num_bytes < 1000:
        return f"{num_bytes} bytes"
    for unit in ("kB", "MB", "GB", "TB"):
        num_bytes /= 1000
        if num_bytes < 1000 or unit == "TB":
            return f"{num_bytes:.1f} {unit}"


def build_config(data_set: records.DataSet, manual_dir: str, *, max_image_pixels: int | None = None,
                 data_config=None, stored_short_side: int = 0) -> FolderBuildConfig:
    """The build `manual_dir` makes now (its `.name` is the build's folder under `<data_dir>/fgpair_folder/`):
    the reader's index, where its files are, and their key. Raises what the reader raises."""
    max_image_pixels = images.check_max_image_pixels(max_image_pixels)
    index = data_set.read_index(manual_dir, data_config)
    located = locate(index)
    key = build_key(data_set.name, index, located.paths, stored_short_side)
    return FolderBuildConfig(data_set=data_set.name, index=index, located=located, key=key,
                             max_image_pixels=max_image_pixels, stored_short_side=stored_short_side)


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """What the trainer needs to know about a loaded build."""

    num_classes: int
    class_ids: tuple[int, ...]  # the data set's own id of each label
    class_names: tuple[str, ...]
    split_sizes: Mapping[str, int]
    skipped_files: Mapping[str, tuple[str, ...]]  # per split: images left out at build time, for any reason
    builder_dir: str
    # per split: {reason in SKIP_REASONS: file names}
    skipped_by_reason: Mapping[str, Mapping[str, tuple[str, ...]]] = dataclasses.field(default_factory=dict)
    data_set: str = "cub"
    has_boxes: bool = False
    built_now: bool = dataclasses.field(default=False, compare=False)  # False: an existing build was reused


def load_sources(
    data_set: records.DataSet, manual_dir: str, data_dir: str, *, max_image_pixels: int | None = None,
    data_config=None, check_index=None, stored_short_side: int = 0, encoded_images: bool = False,
) -> tuple[dict[str, Sequence[dict]], SourceInfo]:
    """Builds the data set's folder into `data_dir` on first use (reused afterwards) and opens random-access
    sources.

    Each source element is a dict: image uint8 [H,W,3] (decoded with PIL), label int64 in 0..C-1, class_id,
    image_id, file_name (bytes), box float32 [4] (x_min, y_min, x_max, y_max in pixels; the whole image
    where the data set has none). `data_config` (`config.data`) carries the data set's own knobs to its
    reader. `check_index(index)`, when given, runs on the reader's `DataIndex` before anything is built (e.g.
    box crops asked of a folder without boxes: `sources.check_crops`). `max_image_pixels`: images with more pixels are skipped as "too large"; None means Pillow's
    decompression-bomb limit (2 x PIL.Image.MAX_IMAGE_PIXELS, about 179 million). A raised limit is a build
    of its own, and so is each `stored_short_side` (0: images stored as they are; else each image's shorter
    side at most that many pixels, `images.stored_size`). `encoded_images`: each record's image is a
    `jpeg.EncodedImage` (decoded when used, at reduced size where the crops allow) instead of pixels.

    Raises: the reader's `DataError`/`MissingFileError` for a folder it cannot read, `DataError` for a split
    with nothing readable, `DataWriteError` when the storage refuses the build.
    """
    config = build_config(data_set, manual_dir, max_image_pixels=max_image_pixels, data_config=data_config,
                          stored_short_side=stored_short_side)
    index = config.index
    if check_index is not None:
        check_index(index)
    build_folder = _build_folder(data_dir, config.name)
    with _write_errors_as_one_line(data_dir), build_lock(data_dir, config.name):
        # Nobody else is building this config now: what an earlier, killed build left is stale.
        remove_unfinished_builds(build_folder)
        # Made under the lock: a builder reads an existing build's info when it is constructed.
        builder = FolderBuild(config=config, data_dir=data_dir, file_format="array_record")
        built_now = not os.path.exists(os.path.join(os.fspath(builder.data_dir), "dataset_info.json"))
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
            )
        except BaseException:
            # TFDS removes its incomplete.* folder itself; this covers a removal that failed too. A finished
            # build (renamed to its version folder) is never touched.
            remove_unfinished_builds(build_folder, report=False)
            raise
    info = builder.info
    split_sizes = {split: info.splits[split].num_examples for split in SPLITS}
    empty = [split for split, size in split_sizes.items() if size == 0]
    if empty:
        raise DataError(f"{index.data_set} {manual_dir!r}: no decodable images in split(s) {empty}; "
                        f"{index.expected_layout}.")
    info_out = SourceInfo(
        num_classes=len(index.class_names),
        class_ids=index.class_ids,
        class_names=index.class_names,
        split_sizes=split_sizes,
        skipped_files={split: tuple(info.metadata.get(f"skipped_{split}", ())) for split in SPLITS},
        builder_dir=os.fspath(builder.data_dir),
        skipped_by_reason={split: _by_reason(info.metadata, split) for split in SPLITS},
        data_set=data_set.name,
        has_boxes=index.has_boxes,
        built_now=built_now,
    )
    if encoded_images:
        skip = {"image": tfds.decode.SkipDecoding()}
        return {split: jpeg.EncodedRecords(builder.as_data_source(split, decoders=skip)) for split in SPLITS}, info_out
    return {split: builder.as_data_source(split) for split in SPLITS}, info_out


# TFDS's absl WARNING on constructing any builder whose config is not one of its class's (all of ours).
_CUSTOM_CONFIG_MESSAGE = "Using custom data configuration"


class _DropMessages(logging.Filter):
    """Drops log records whose message template starts with one of `prefixes`."""

    def __init__(self, prefixes: Sequence[str]):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def _without_absl_messages(*prefixes: str):
    """While inside: records of absl's logger (TFDS logs through it) starting with `prefixes` are dropped."""
    absl_logger, drop = logging.getLogger("absl"), _DropMessages(prefixes)
    absl_logger.addFilter(drop)
    try:
        yield
    finally:
        absl_logger.removeFilter(drop)


@contextlib.contextmanager
def build_lock(data_dir: str, config_name: str):
    """Hold the exclusive lock of the build `config_name` in `data_dir` (see the module docstring); a
    process that has to wait says so once. The lock file is `<data_dir>/fgpair_folder/<config name>.lock`."""
    path = f"{_build_folder(data_dir, config_name)}.lock"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with locks.exclusive(path, f"building {config_name}"):
        yield


def _by_reason(metadata: Mapping, split: str) -> dict[str, tuple[str, ...]]:
    """{reason: file names} skipped from `split`, as recorded in the build's metadata ({} for old builds)."""
    return {reason: tuple(names) for reason, names in metadata.get(f"skipped_{split}_by_reason", {}).items()}


def _build_folder(data_dir: str, config_name: str) -> str:
    """`<data_dir>/fgpair_folder/<config name>`: the versions of one build, and TFDS's incomplete.* folders."""
    return os.path.join(data_dir, FolderBuild.name, config_name)


def remove_unfinished_builds(build_folder: str, report: bool = True) -> list[str]:
    """Removes TFDS's temporary folders (`incomplete.<random>_<version>`) in `build_folder` and returns their
    names; with `report`, says so in one line. Call only under the build's lock (`build_lock`): then no other
    process is writing one, and any there was left by a build that was killed (`kill -9`, a lost node)."""
    try:
        names = sorted(name for name in os.listdir(build_folder) if name.startswith(tfds_constants.INCOMPLETE_PREFIX)
                       and os.path.isdir(os.path.join(build_folder, name)))
    except OSError:  # no build folder yet
        return []
    removed, failed = [], []
    for name in names:
        try:
            shutil.rmtree(os.path.join(build_folder, name))
            removed.append(name)
        except OSError as error:
            failed.append(f"{name} ({error.strerror or type(error).__name__})")
    if report and removed:
        _LOG.warning("Removed %d unfinished build folder%s left by an interrupted build in %s: %s", len(removed),
                     "" if len(removed) == 1 else "s", build_folder, ", ".join(removed))
    if failed:
        _LOG.warning("Could not remove unfinished build folders in %s: %s; delete them by hand.", build_folder,
                     ", ".join(failed))
    return removed


_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
_NEVER_A_READ = (*_NO_ROOM, errno.EROFS)  # reasons only a write can fail with
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST)  # a write when the path is in data_dir


def write_failure(error: BaseException, data_dir: str) -> tuple[int, str] | None:
    """(errno, the operating system's reason) if `error`, or an error it was raised from or while handling, is
    a write into `data_dir` the storage refused (no space, quota, read-only, not a writable folder); else None.

    TFDS re-raises a writer's OSError as a new one without its errno (from the original), and array_record's
    C++ writer raises a RuntimeError whose text holds the reason ('write() failed: No space left on device'):
    the whole chain is searched, by errno and by the operating system's wording."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and (error.errno in _NEVER_A_READ or (
                error.errno in _NOT_WRITABLE and _inside(data_dir, error.filename, error.filename2))):
            return error.errno, error.strerror or os.strerror(error.errno)
        for code in _NEVER_A_READ:
            if os.strerror(code) in str(error):
                return code, os.strerror(code)
        error = error.__cause__ or error.__context__
    return None


def _inside(folder: str, *paths) -> bool:
    """Whether any of `paths` (None, str or bytes) is `folder` or lies within it."""
    root = os.path.abspath(folder)
    for path in paths:
        if path is None:
            continue
        with contextlib.suppress(ValueError, TypeError):
            if os.path.commonpath([root, os.path.abspath(os.fsdecode(path))]) == root:
                return True
    return False


@contextlib.contextmanager
def _write_errors_as_one_line(data_dir: str):
    """A build the storage refuses (`write_failure`) becomes one `DataWriteError` naming `data_dir`, the reason
    and the fix, like a checkpoint that cannot be written (checkpointing.py); anything else passes unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        failure = write_failure(error, data_dir)
        if failure is None:
            raise
        code, reason = failure
        fix = ("Free space there, or set config.data.data_dir (or $TFDS_DATA_DIR) to a folder on a disk with room"
               if code in _NO_ROOM else
               "Make it a writable folder, or set config.data.data_dir (or $TFDS_DATA_DIR) to one")
        raise DataWriteError(f"Could not write the data build to TFDS data_dir {data_dir!r} ({reason}); nothing of "
                             f"it was kept. {fix}, then rerun.") from error
