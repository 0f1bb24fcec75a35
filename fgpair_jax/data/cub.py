"""TFDS builder that reads an extracted CUB_200_2011/ folder, and a loader that returns random-access sources.

Why a builder of our own: TFDS's built-in `caltech_birds2011` downloads the official tarball and cannot
read a folder that is already on disk (clusters without internet, the 100-class subset used for tests).
Why ArrayRecord: it is the only file format TFDS writes and reads without TensorFlow, and it gives
random access, which grain's index-based shuffling and checkpointing need.

Identity of a build: the label set depends on the folder (the full release has 200 classes, the shared
subset 100 with gaps in the ids), so the BuilderConfig is derived from the folder. Its name is
`classes<C>_<fingerprint>` where the fingerprint is the first 10 hex digits of a SHA-256 over the four
index files. Two different folders therefore never collide in one data_dir, and the same folder (even when
moved) reuses its build: `<data_dir>/cub_folder/<config name>/1.0.0/`.

Image hygiene happens once, at build time: every image is fully decoded; valid RGB JPEGs are stored
byte-for-byte, anything else (greyscale, CMYK, RGBA, PNG under a .jpg name, ...) is converted to an RGB
JPEG. Files that cannot be stored are skipped and reported as what they are, one warning per split and
reason: "missing" (no such file, even across Unicode normal forms), "undecodable" (not a complete image)
and "too large" (more pixels than `max_image_pixels`; default Pillow's decompression-bomb limit). A split
with no readable image at all is a one-line error. The decode is strict even where PIL has been told to
accept truncated files. Nothing undecodable can reach training.

Index files are UTF-8, with or without the byte order mark Windows editors (Notepad, Excel) write.

Names: images.txt is matched to the files part by part, exactly first, then across Unicode normal forms
(NFC/NFD): a folder prepared or unzipped on macOS stores 'é' as 'e' + U+0301, other bytes on Linux. Each
folder is listed once per build (`FolderListing`), so the lookup stays linear in the number of names. A name
found only in another letter case ('.JPG' on disk for '.jpg') stays missing; the warning says so.

Before the first image is decoded, the build checks what it can know: the index files are unchanged, each
split has at least one listed file on disk, and the disk has at least as much free space as those files take.

Large images: readers decode with Pillow in fresh processes, which refuse more than 2 x
`PIL.Image.MAX_IMAGE_PIXELS` and warn above it. An image accepted above `STORED_MAX_PIXELS` (possible once
`max_image_pixels` is raised deliberately) is therefore stored downscaled to fit, and reported.

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
import fcntl
import hashlib
import io
import logging
import os
import shutil
import unicodedata
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageFile
from tensorflow_datasets.core import constants as tfds_constants

from fgpair_jax.errors import ConfigError, DataError, DataWriteError, MissingFileError, UserError

_LOG = logging.getLogger(__name__)

INDEX_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
EXPECTED_LAYOUT = (
    "expected the extracted official CUB_200_2011/ folder with images.txt, image_class_labels.txt, "
    "train_test_split.txt, classes.txt and images/<class>/<file>.jpg; set config.data.manual_dir to it"
)
SPLITS = ("train", "test")
_FINGERPRINT_HEX_DIGITS = 10
_REENCODE_JPEG_QUALITY = 95
_SKIPPED_NAMES_SHOWN = 5
MISSING, UNDECODABLE, TOO_LARGE = "missing", "undecodable", "too large"
SKIP_REASONS = (MISSING, UNDECODABLE, TOO_LARGE)
STORED_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's default (about 89 million): readers decode this quietly


class UnreadableImage(Exception):
    """A listed image that cannot be stored; `reason` is one of SKIP_REASONS, `detail` says more."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class CubIndex:
    """The parsed index files of one CUB folder; per-image tuples are aligned and sorted by image id."""

    image_ids: tuple[int, ...]
    file_names: tuple[str, ...]
    class_ids: tuple[int, ...]
    is_train: tuple[bool, ...]
    present_class_ids: tuple[int, ...]  # sorted original ids; label = position in this tuple
    present_class_names: tuple[str, ...]


def _layout_error(manual_dir: str, problem: str) -> DataError:
    return DataError(f"CUB folder {manual_dir!r}: {problem}; {EXPECTED_LAYOUT}.")


def _index_error(manual_dir: str, problem: str) -> DataError:
    """An index file contradicts itself or another one: one line; nothing has been built yet."""
    return DataError(f"CUB folder {manual_dir!r}: {problem}. Correct the index file (nothing was built).")


def _read_id_table(manual_dir: str, file_name: str, id_kind: str = "image id") -> tuple[dict[int, str], dict[int, int]]:
    """Parses '<int id> <value>' lines into ({id: value}, {id: line number}); blank lines are ignored.

    Raises a one-line ValueError for a line of another shape (a layout error) and for an id on two lines,
    naming the file, both line numbers and the id: a later line must not silently overwrite an earlier one
    (a second label line would change the image's class, a second split line move it between train and test).
    """
    table: dict[int, str] = {}
    line_of: dict[int, int] = {}
    try:
        # utf-8-sig: a byte order mark (Windows Notepad, Excel) is dropped; text without one reads as UTF-8.
        with open(os.path.join(manual_dir, file_name), encoding="utf-8-sig") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                parts = line.split(maxsplit=1)
                if len(parts) != 2 or not parts[0].isdigit():
                    raise _layout_error(manual_dir, f"{file_name} line {line_number} is not '<id> <value>'")
                key, value = int(parts[0]), parts[1].strip()
                if key in table:
                    raise _index_error(manual_dir, _repeated_id(file_name, id_kind, key, (line_of[key], table[key]),
                                                                (line_number, value)))
                table[key], line_of[key] = value, line_number
    except UnicodeDecodeError as error:  # A binary or UTF-16 file: say which one, not a bare codec error.
        problem = f"{file_name} is not UTF-8 text ({error.reason} at byte {error.start})"
        raise _layout_error(manual_dir, problem) from None
    except OSError as error:  # a folder under that name, no permission, an I/O error
        problem = f"{file_name} cannot be read ({error.strerror or type(error).__name__})"
        raise _layout_error(manual_dir, problem) from None
    return table, line_of


def _repeated_id(file_name: str, id_kind: str, key: int, first: tuple[int, str], again: tuple[int, str]) -> str:
    """'<file> line <n> repeats <id kind> <id> of line <m>', saying whether the two values conflict."""
    (first_line, first_value), (line, value) = first, again
    where = f"{file_name} line {line} repeats {id_kind} {key} of line {first_line}"
    if value == first_value:
        return f"{where} (same value {value!r})"
    return f"{where} with a conflicting value ({value!r} after {first_value!r})"


def _check_folder_exists(manual_dir: str) -> None:
    """One-line FileNotFoundError naming what is wrong with the folder itself, before any index is read.

    Besides a missing folder or missing parts, it names the two usual slips: an empty folder (extraction not
    done or still running) and the parent of the extracted folder (the tarball unpacks to CUB_200_2011/).
    """
    if not manual_dir or not os.path.isdir(manual_dir):
        problem = "is a file, not a folder" if manual_dir and os.path.exists(manual_dir) else "does not exist"
        raise MissingFileError(f"CUB folder {manual_dir!r} {problem}; {EXPECTED_LAYOUT}.")
    try:
        entries = os.listdir(manual_dir)
    except OSError as error:  # no permission to list it, an I/O error
        raise _layout_error(manual_dir, f"cannot be listed ({error.strerror or type(error).__name__})") from None
    if not entries:
        raise MissingFileError(f"CUB folder {manual_dir!r} is empty; {EXPECTED_LAYOUT}.")
    missing = [name for name in (*INDEX_FILES, "images") if not os.path.exists(os.path.join(manual_dir, name))]
    if missing:
        nested = sorted(
            name for name in os.listdir(manual_dir) if os.path.isfile(os.path.join(manual_dir, name, "images.txt"))
        )
        hint = f" (its subfolder {nested[0]!r} holds an images.txt: point there)" if nested else ""
        raise MissingFileError(f"CUB folder {manual_dir!r} lacks {', '.join(missing)}{hint}; {EXPECTED_LAYOUT}.")


def read_cub_index(manual_dir: str) -> CubIndex:
    """Reads and cross-checks the index files; raises one clear error naming the layout if anything is off."""
    _check_folder_exists(manual_dir)
    images, image_lines = _read_id_table(manual_dir, "images.txt")
    labels, _ = _read_id_table(manual_dir, "image_class_labels.txt")
    split, _ = _read_id_table(manual_dir, "train_test_split.txt")
    classes, _ = _read_id_table(manual_dir, "classes.txt", id_kind="class id")
    if not images:
        raise _layout_error(manual_dir, "images.txt lists no images")
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", split)):
        if table.keys() != images.keys():
            odd = sorted(table.keys() ^ images.keys())[:5]
            raise _layout_error(manual_dir, f"image ids in {name} differ from images.txt (e.g. {odd})")
    bad = [i for i in images if not labels[i].isdigit() or split[i] not in ("0", "1")]
    if bad:
        raise _layout_error(manual_dir, f"non-integer class id or split flag for image ids {bad[:5]}")
    _check_each_file_listed_once(manual_dir, images, image_lines, split)
    image_ids = tuple(sorted(images))
    class_ids = tuple(int(labels[i]) for i in image_ids)
    present = tuple(sorted(set(class_ids)))
    unnamed = [c for c in present if c not in classes]
    if unnamed:
        raise _layout_error(manual_dir, f"class ids {unnamed[:5]} are used but missing from classes.txt")
    return CubIndex(
        image_ids=image_ids,
        file_names=tuple(images[i] for i in image_ids),
        class_ids=class_ids,
        is_train=tuple(split[i] == "1" for i in image_ids),
        present_class_ids=present,
        present_class_names=tuple(classes[c] for c in present),
    )


def same_file_key(file_name: str) -> str:
    """What two names in images.txt have in common when they name one file: Unicode normal form NFC and
    a normalised path ('a//b.jpg', './a/b.jpg' and 'a/b.jpg' are one file)."""
    return os.path.normpath(unicodedata.normalize("NFC", file_name))


def _check_each_file_listed_once(manual_dir: str, images: dict, image_lines: dict, split: dict) -> None:
    """One-line ValueError if images.txt lists one image file under two ids (naming both lines, ids and the
    file): it would be stored twice, and with one id in train and one in test a test image leaks into SSL."""
    first_id: dict[str, int] = {}
    for image_id in sorted(images, key=image_lines.get):
        key = same_file_key(images[image_id])
        if key not in first_id:
            first_id[key] = image_id
            continue
        other = first_id[key]
        leak = " (one in train, one in test: a test image would be trained on)"
        raise _index_error(
            manual_dir, f"images.txt line {image_lines[image_id]} lists {images[image_id]!r} as image id {image_id}, "
            f"but line {image_lines[other]} already lists that file as image id {other}"
            f"{leak if split[other] != split[image_id] else ''}"
        )


def index_fingerprint(manual_dir: str) -> str:
    """Short content hash of the index files: names the build, so different folders never share one."""
    digest = hashlib.sha256()
    for name in INDEX_FILES:
        with open(os.path.join(manual_dir, name), "rb") as handle:
            digest.update(name.encode() + b"\0" + handle.read() + b"\0")
    return digest.hexdigest()[:_FINGERPRINT_HEX_DIGITS]


def find_image(images_dir: str, file_name: str, listing: FolderListing | None = None) -> str | None:
    """The path on disk of `file_name` ('/'-separated, relative to `images_dir`), or None if there is none.

    Each part is matched exactly first, then across Unicode normal forms (NFC/NFD, see the module docstring).
    Pass one `FolderListing` for many lookups: each folder is then listed once, not once per name.
    """
    listing = FolderListing() if listing is None else listing
    path = images_dir
    for part in file_name.split("/"):
        path = listing.entry(path, part)
        if path is None:
            return None
    return path


class FolderListing:
    """The entries of folders, each listed and normalised once, for looking up many names.

    A name that is not spelt on disk exactly as listed (another Unicode normal form, or no such file at all)
    needs the folder's entries; listing the folder again for each such name made a build quadratic in the
    folder's size (8,000 names in one folder: over a minute). Make one per build: it does not see files that
    appear later.
    """

    def __init__(self):
        self._by_form: dict[str, dict[str, str] | None] = {}  # folder -> {NFC name: entry}, None: not a folder
        self._by_case: dict[str, dict[str, str]] = {}  # folder -> {casefolded NFC name: entry}

    def _entries(self, folder: str) -> dict[str, str] | None:
        if folder not in self._by_form:
            try:
                entries = sorted(os.listdir(folder))
            except OSError:  # `folder` is missing or not a folder
                self._by_form[folder] = None
            else:
                by_form: dict[str, str] = {}
                for entry in entries:  # sorted: of several entries equal in NFC, the first one wins
                    by_form.setdefault(unicodedata.normalize("NFC", entry), entry)
                self._by_form[folder] = by_form
        return self._by_form[folder]

    def entry(self, folder: str, name: str) -> str | None:
        """`folder/name` if it exists, else the entry of `folder` equal to `name` in NFC (first in sorted order)."""
        exact = os.path.join(folder, name)
        if os.path.lexists(exact):
            return exact
        match = (self._entries(folder) or {}).get(unicodedata.normalize("NFC", name))
        return None if match is None else os.path.join(folder, match)

    def other_case(self, images_dir: str, file_name: str) -> str | None:
        """For a name `find_image` does not find: the file on disk it names in another letter case (the name
        relative to `images_dir`, e.g. 'a/B.JPG' for 'a/b.jpg'), or None. A hint only: names never match so."""
        path, parts = images_dir, []
        for part in file_name.split("/"):
            found = self.entry(path, part)
            if found is None:
                if path not in self._by_case:
                    by_case: dict[str, str] = {}
                    for form, entry in sorted((self._entries(path) or {}).items(), key=lambda item: item[1]):
                        by_case.setdefault(form.casefold(), entry)
                    self._by_case[path] = by_case
                entry = self._by_case[path].get(unicodedata.normalize("NFC", part).casefold())
                if entry is None:
                    return None
                found = os.path.join(path, entry)
            parts.append(os.path.basename(found))
            path = found
        return "/".join(parts)


def pixel_limit(max_image_pixels: int | None) -> int | None:
    """The most pixels an image may have: `max_image_pixels`, or for None Pillow's own limit, 2 x
    `PIL.Image.MAX_IMAGE_PIXELS` (above it Pillow raises DecompressionBombError; None there means no limit)."""
    if max_image_pixels is not None:
        return max_image_pixels
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


@contextlib.contextmanager
def _strict_pillow():
    """A strict decode whatever Pillow's globals say, and no pixel check of Pillow's own (`load_rgb_jpeg`
    applies the limit). TFDS sets LOAD_TRUNCATED_IMAGES=True when it draws a thumbnail (other libraries do
    too): a truncated JPEG accepted here would be stored byte-for-byte and fail mid-run in a fresh process."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = False, None
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


def load_rgb_jpeg(path: str, max_image_pixels: int | None = None) -> tuple[bytes, bool]:
    """(RGB JPEG bytes to store, whether the image was downscaled) for the image file at `path`.

    The original bytes when already an RGB JPEG of at most STORED_MAX_PIXELS pixels; otherwise the fully
    decoded image converted to RGB (and downscaled to STORED_MAX_PIXELS) and re-encoded. Raises
    `UnreadableImage` with reason MISSING (no file), TOO_LARGE (more than `pixel_limit(max_image_pixels)`
    pixels; checked from the header, before decoding) or UNDECODABLE (anything Pillow cannot fully decode).
    Pillow's own check is off meanwhile: this one applies its criterion (pixels > 2 x MAX_IMAGE_PIXELS, its
    DecompressionBombError) by default, and a deliberately raised limit instead.
    """
    limit = pixel_limit(max_image_pixels)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise UnreadableImage(MISSING) from None
    except OSError as error:  # a folder, no permission, an I/O error
        raise UnreadableImage(UNDECODABLE, error.strerror or type(error).__name__) from None
    with _strict_pillow():
        try:
            with Image.open(io.BytesIO(raw)) as image:
                if limit is not None and image.width * image.height > limit:
                    raise UnreadableImage(TOO_LARGE, f"{image.width}x{image.height} pixels, above {limit}")
                image.load()  # A full decode: truncated files fail here, not mid-training.
                return _stored_jpeg(raw, image)
        except (OSError, SyntaxError, ValueError) as error:
            raise UnreadableImage(UNDECODABLE, str(error) or type(error).__name__) from None


def _stored_jpeg(raw: bytes, image: Image.Image) -> tuple[bytes, bool]:
    """`raw` if it is an RGB JPEG readers can decode quietly, else `image` as one: (bytes, downscaled)."""
    pixels = image.width * image.height
    if image.format == "JPEG" and image.mode == "RGB" and pixels <= STORED_MAX_PIXELS:
        return raw, False
    rgb = image.convert("RGB")
    downscaled = pixels > STORED_MAX_PIXELS
    if downscaled:
        scale = (STORED_MAX_PIXELS / pixels) ** 0.5
        rgb = rgb.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))),
                         Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=_REENCODE_JPEG_QUALITY)
    return buffer.getvalue(), downscaled


def as_rgb_jpeg_bytes(path: str, max_image_pixels: int | None = None) -> bytes | None:
    """The bytes `load_rgb_jpeg` would store for `path`, or None if it cannot be stored (for any reason)."""
    try:
        return load_rgb_jpeg(path, max_image_pixels)[0]
    except UnreadableImage:
        return None


class CubFolderConfig(tfds.core.BuilderConfig):
    """A build of one CUB folder: its present classes (the label set), the fingerprint naming it and the
    pixel limit it was built with (a raised `max_image_pixels` keeps images a default build skips, so it
    names a build of its own: `classes<C>_<fingerprint>_max<N>px`)."""

    def __init__(self, *, class_ids: Sequence[int], class_names: Sequence[str], fingerprint: str,
                 max_image_pixels: int | None = None):
        limit = "" if max_image_pixels is None else f"_max{max_image_pixels}px"
        super().__init__(
            name=f"classes{len(class_ids)}_{fingerprint}{limit}",
            description=f"CUB folder with {len(class_ids)} classes, index fingerprint {fingerprint}.",
        )
        self.class_ids = tuple(int(c) for c in class_ids)
        self.class_names = tuple(class_names)
        self.fingerprint = fingerprint
        self.max_image_pixels = max_image_pixels

    @classmethod
    def from_folder(cls, manual_dir: str, max_image_pixels: int | None = None) -> "CubFolderConfig":
        index = read_cub_index(manual_dir)
        return cls(
            class_ids=index.present_class_ids,
            class_names=index.present_class_names,
            fingerprint=index_fingerprint(manual_dir),
            max_image_pixels=check_max_image_pixels(max_image_pixels),
        )


def check_max_image_pixels(max_image_pixels: int | None) -> int | None:
    """`max_image_pixels` if it is None or a positive integer, else a one-line ValueError."""
    is_integer = isinstance(max_image_pixels, int) and not isinstance(max_image_pixels, bool)
    if max_image_pixels is None or (is_integer and max_image_pixels > 0):
        return max_image_pixels
    raise ConfigError(f"config.data.max_image_pixels={max_image_pixels!r}: use a positive integer, or None for "
                     f"Pillow's decompression-bomb limit.")


class CubFolder(tfds.core.GeneratorBasedBuilder):
    """CUB-200-2011 (or a subset in the same layout) read from a local folder given as manual_dir.

    Use `CubFolder(config=CubFolderConfig.from_folder(manual_dir), data_dir=..., file_format="array_record")`
    or simply `load_cub_sources`.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: reads an extracted CUB_200_2011/ folder.",
        "1.1.0": "Names matched across Unicode normal forms; skips recorded by reason (missing, undecodable, "
                 "too large); images above Pillow's pixel limit stored downscaled.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Extract CUB_200_2011.tgz (https://www.vision.caltech.edu/datasets/cub_200_2011/) and pass the "
        "resulting CUB_200_2011/ folder as manual_dir (config.data.manual_dir). It must hold images.txt, "
        "image_class_labels.txt, train_test_split.txt, classes.txt and images/<class>/<file>.jpg. A subset "
        "in the same layout works too: labels are the classes present, in order of original id."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        if not isinstance(config, CubFolderConfig):
            raise ValueError(
                "CubFolder needs config=CubFolderConfig.from_folder(manual_dir) (set config.data.manual_dir)."
            )
        return tfds.core.DatasetInfo(
            builder=self,
            description="Caltech-UCSD Birds-200-2011 from a local folder; labels are the present classes.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=config.class_names),
                    "class_id": tfds.features.Scalar(dtype=np.int32, doc="original CUB class id"),
                    "image_id": tfds.features.Scalar(dtype=np.int32, doc="id in images.txt"),
                    "file_name": tfds.features.Text(doc="path relative to images/"),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """Everything knowable before the first image is decoded is checked here: the index files (unchanged
        since the config was made), each split's images on disk (at least one), the room to store them."""
        manual_dir = os.fspath(dl_manager.manual_dir)
        index = read_cub_index(manual_dir)
        fingerprint = index_fingerprint(manual_dir)
        if fingerprint != self.builder_config.fingerprint:
            raise DataError(
                f"CUB folder {manual_dir!r}: its index files changed while the build was starting (fingerprint "
                f"{self.builder_config.fingerprint}, now {fingerprint}); nothing was built. Let whatever is "
                f"editing the folder finish, then rerun."
            )
        for split in SPLITS:
            if (split == "train") not in index.is_train:
                raise _layout_error(manual_dir, f"train_test_split.txt leaves the {split} split empty")
        images_dir = os.path.join(manual_dir, "images")
        listing = FolderListing()  # one listing per folder for all names, both splits (see FolderListing)
        paths = tuple(find_image(images_dir, name, listing) for name in index.file_names)
        other_case = {name: listing.other_case(images_dir, name)
                      for name, path in zip(index.file_names, paths) if path is None}
        other_case = {name: on_disk for name, on_disk in other_case.items() if on_disk is not None}
        for split in SPLITS:
            listed = [(name, path) for name, path, is_train in zip(index.file_names, paths, index.is_train)
                      if is_train == (split == "train")]
            if all(path is None for _, path in listed):
                raise _nothing_readable_error(manual_dir, split, {MISSING: [name for name, _ in listed]}, other_case)
        _check_room(self.data_dir, paths)
        return {split: self._generate_examples(manual_dir, index, split, paths, other_case) for split in SPLITS}

    def _generate_examples(self, manual_dir: str, index: CubIndex, split: str, paths: Sequence[str | None],
                           other_case: Mapping[str, str]):
        """The split's examples; `paths`: each listed image's file (`find_image`; None: missing), aligned with
        `index`; `other_case`: {missing name: a file naming it in another letter case} for the warning."""
        label_of_class = {class_id: label for label, class_id in enumerate(index.present_class_ids)}
        skipped: list[tuple[str, str]] = []  # (file name, reason), in image id order
        downscaled: list[str] = []
        for image_id, file_name, path, class_id, is_train in zip(
            index.image_ids, index.file_names, paths, index.class_ids, index.is_train
        ):
            if is_train != (split == "train"):
                continue
            try:
                if path is None:
                    raise UnreadableImage(MISSING)
                jpeg, was_downscaled = load_rgb_jpeg(path, self.builder_config.max_image_pixels)
            except UnreadableImage as problem:
                skipped.append((file_name, problem.reason))
                continue
            if was_downscaled:
                downscaled.append(file_name)
            yield image_id, {
                "image": jpeg,
                "label": label_of_class[class_id],
                "class_id": class_id,
                "image_id": image_id,
                "file_name": file_name,
            }
        self._record_and_report(manual_dir, index, split, skipped, downscaled, other_case)

    def _record_and_report(self, manual_dir, index, split, skipped: list, downscaled: list,
                           other_case: Mapping[str, str]) -> None:
        """Keeps the skipped and downscaled names in the build's metadata and warns once per split and reason;
        a split of which nothing could be stored is a one-line error."""
        every_skip = [name for name, _ in skipped]
        by_reason = {reason: [name for name, why in skipped if why == reason] for reason in SKIP_REASONS}
        by_reason = {reason: names for reason, names in by_reason.items() if names}
        self.info.metadata[f"skipped_{split}"] = every_skip
        self.info.metadata[f"skipped_{split}_by_reason"] = by_reason
        self.info.metadata[f"downscaled_{split}"] = downscaled
        if every_skip and len(every_skip) == sum(flag == (split == "train") for flag in index.is_train):
            # Otherwise TFDS fails with a bare 'No examples were yielded' assertion.
            raise _nothing_readable_error(manual_dir, split, by_reason, other_case)
        for reason, names in by_reason.items():
            _LOG.warning("CUB %s split: skipped %d %s images: %s%s", split, len(names), reason,
                         ", ".join(names[:_SKIPPED_NAMES_SHOWN]), _hint(reason, names, other_case))
        if downscaled:
            _LOG.warning("CUB %s split: stored %d images downscaled to %d pixels (Pillow's limit, so that every "
                         "reader decodes them): %s", split, len(downscaled), STORED_MAX_PIXELS,
                         ", ".join(downscaled[:_SKIPPED_NAMES_SHOWN]))


_HINTS = {
    TOO_LARGE: " (more pixels than Pillow's decompression-bomb limit or config.data.max_image_pixels; raise "
               "config.data.max_image_pixels to keep them)",
}


def _hint(reason: str, names: Sequence[str], other_case: Mapping[str, str]) -> str:
    """What to add to a count of `names` skipped for `reason`: its fix, or for missing names spelt on disk in
    another letter case ('.JPG' for '.jpg'; see `FolderListing.other_case`) how many and one example."""
    if reason != MISSING:
        return _HINTS.get(reason, "")
    found = [name for name in names if name in other_case]
    if not found:
        return ""
    verb = "is" if len(found) == 1 else "are"
    return (f" ({len(found)} of them {verb} on disk in another letter case, e.g. {other_case[found[0]]!r} for "
            f"{found[0]!r}: correct images.txt or rename the files)")


def _nothing_readable_error(manual_dir: str, split: str, by_reason: Mapping[str, Sequence[str]],
                            other_case: Mapping[str, str]) -> DataError:
    """No image of `split` can be stored: one line with the count per reason (`by_reason`, non-empty) and the
    hint of the most common one."""
    names = [name for reason_names in by_reason.values() for name in reason_names]
    counts = ", ".join(f"{len(reason_names)} {reason}" for reason, reason_names in by_reason.items())
    main_reason = max(by_reason, key=lambda reason: len(by_reason[reason]))
    return _layout_error(
        manual_dir,
        f"none of the {len(names)} {split} images listed in images.txt could be read from images/ "
        f"({counts}, e.g. {names[0]!r}){_hint(main_reason, by_reason[main_reason], other_case)}",
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


@dataclasses.dataclass(frozen=True)
class CubSourceInfo:
    """What the trainer needs to know about a loaded CUB build."""

    num_classes: int
    class_ids: tuple[int, ...]  # original CUB id of each label
    class_names: tuple[str, ...]
    split_sizes: Mapping[str, int]
    skipped_files: Mapping[str, tuple[str, ...]]  # per split: images left out at build time, for any reason
    builder_dir: str
    # per split: {reason in SKIP_REASONS: file names}; empty for a build made before reasons were recorded
    skipped_by_reason: Mapping[str, Mapping[str, tuple[str, ...]]] = dataclasses.field(default_factory=dict)


def load_cub_sources(
    manual_dir: str, data_dir: str, *, max_image_pixels: int | None = None
) -> tuple[dict[str, Sequence[dict]], CubSourceInfo]:
    """Builds the folder into `data_dir` on first use (reused afterwards) and opens random-access sources.

    Each source element is a dict: image uint8 [H,W,3] (decoded with PIL), label int64 in 0..C-1,
    class_id, image_id, file_name (bytes). Pass workdir/tfds or $TFDS_DATA_DIR as data_dir.
    `max_image_pixels`: images with more pixels are skipped as "too large"; None means Pillow's
    decompression-bomb limit (2 x PIL.Image.MAX_IMAGE_PIXELS, about 179 million). Raise it to keep large
    photos deliberately; a raised limit is a build of its own.
    """
    folder_config = CubFolderConfig.from_folder(manual_dir, max_image_pixels)
    build_folder = _build_folder(data_dir, folder_config.name)
    with _write_errors_as_one_line(data_dir), build_lock(data_dir, folder_config.name):
        # Nobody else is building this config now: what an earlier, killed build left is stale.
        remove_unfinished_builds(build_folder)
        # Made under the lock: a builder reads an existing build's info when it is constructed.
        builder = CubFolder(config=folder_config, data_dir=data_dir, file_format="array_record")
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
        raise DataError(f"CUB folder {manual_dir!r}: no decodable images in split(s) {empty}; {EXPECTED_LAYOUT}.")
    config = builder.builder_config
    info_out = CubSourceInfo(
        num_classes=len(config.class_ids),
        class_ids=config.class_ids,
        class_names=config.class_names,
        split_sizes=split_sizes,
        skipped_files={split: tuple(info.metadata.get(f"skipped_{split}", ())) for split in SPLITS},
        builder_dir=os.fspath(builder.data_dir),
        skipped_by_reason={split: _by_reason(info.metadata, split) for split in SPLITS},
    )
    return {split: builder.as_data_source(split) for split in SPLITS}, info_out


@contextlib.contextmanager
def build_lock(data_dir: str, config_name: str):
    """Hold the exclusive lock of the build `config_name` in `data_dir` (see the module docstring); a
    process that has to wait says so once. The lock file is `<data_dir>/cub_folder/<config name>.lock`."""
    path = f"{_build_folder(data_dir, config_name)}.lock"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _LOG.warning("Waiting for another process to finish building %s (lock %s).", config_name, path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _by_reason(metadata: Mapping, split: str) -> dict[str, tuple[str, ...]]:
    """{reason: file names} skipped from `split`, as recorded in the build's metadata ({} for old builds)."""
    return {reason: tuple(names) for reason, names in metadata.get(f"skipped_{split}_by_reason", {}).items()}


def _build_folder(data_dir: str, config_name: str) -> str:
    """`<data_dir>/cub_folder/<config name>`: the versions of one build, and TFDS's incomplete.* folders."""
    return os.path.join(data_dir, CubFolder.name, config_name)


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
        raise DataWriteError(f"Could not write the CUB build to TFDS data_dir {data_dir!r} ({reason}); nothing of "
                             f"it was kept. {fix}, then rerun.") from error
