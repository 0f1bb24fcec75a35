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
JPEG, and undecodable or missing files are skipped and reported in one warning per split (a split with
no readable image at all is a one-line error). The decode is strict even where PIL has been told to
accept truncated files. Nothing undecodable can reach training.

Multi-host: build once (e.g. on process 0, or before launching) when several processes share a data_dir;
concurrent first builds of the same config race on TFDS's temporary directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import unicodedata
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageFile

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


@dataclasses.dataclass(frozen=True)
class CubIndex:
    """The parsed index files of one CUB folder; per-image tuples are aligned and sorted by image id."""

    image_ids: tuple[int, ...]
    file_names: tuple[str, ...]
    class_ids: tuple[int, ...]
    is_train: tuple[bool, ...]
    present_class_ids: tuple[int, ...]  # sorted original ids; label = position in this tuple
    present_class_names: tuple[str, ...]


def _layout_error(manual_dir: str, problem: str) -> ValueError:
    return ValueError(f"CUB folder {manual_dir!r}: {problem}; {EXPECTED_LAYOUT}.")


def _index_error(manual_dir: str, problem: str) -> ValueError:
    """An index file contradicts itself or another one: one line; nothing has been built yet."""
    return ValueError(f"CUB folder {manual_dir!r}: {problem}. Correct the index file (nothing was built).")


def _read_id_table(manual_dir: str, file_name: str, id_kind: str = "image id") -> tuple[dict[int, str], dict[int, int]]:
    """Parses '<int id> <value>' lines into ({id: value}, {id: line number}); blank lines are ignored.

    Raises a one-line ValueError for a line of another shape (a layout error) and for an id on two lines,
    naming the file, both line numbers and the id: a later line must not silently overwrite an earlier one
    (a second label line would change the image's class, a second split line move it between train and test).
    """
    table: dict[int, str] = {}
    line_of: dict[int, int] = {}
    try:
        with open(os.path.join(manual_dir, file_name), encoding="utf-8") as handle:
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
        raise FileNotFoundError(f"CUB folder {manual_dir!r} {problem}; {EXPECTED_LAYOUT}.")
    if not os.listdir(manual_dir):
        raise FileNotFoundError(f"CUB folder {manual_dir!r} is empty; {EXPECTED_LAYOUT}.")
    missing = [name for name in (*INDEX_FILES, "images") if not os.path.exists(os.path.join(manual_dir, name))]
    if missing:
        nested = sorted(
            name for name in os.listdir(manual_dir) if os.path.isfile(os.path.join(manual_dir, name, "images.txt"))
        )
        hint = f" (its subfolder {nested[0]!r} holds an images.txt: point there)" if nested else ""
        raise FileNotFoundError(f"CUB folder {manual_dir!r} lacks {', '.join(missing)}{hint}; {EXPECTED_LAYOUT}.")


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


def as_rgb_jpeg_bytes(path: str) -> bytes | None:
    """The image at `path` as RGB JPEG bytes (original bytes when already so), or None if undecodable.

    The decode is strict whatever `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` says: TFDS sets that global to True
    when it draws a thumbnail (and other libraries do too), and a truncated JPEG accepted here would be
    stored byte-for-byte and then fail to decode mid-run in a fresh process where the flag is False again.
    """
    lenient = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        with Image.open(io.BytesIO(raw)) as image:
            image.load()  # A full decode: truncated files fail here, not mid-training.
            if image.format == "JPEG" and image.mode == "RGB":
                return raw
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=_REENCODE_JPEG_QUALITY)
            return buffer.getvalue()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


class CubFolderConfig(tfds.core.BuilderConfig):
    """A build of one CUB folder: its present classes (the label set) and the fingerprint naming it."""

    def __init__(self, *, class_ids: Sequence[int], class_names: Sequence[str], fingerprint: str):
        super().__init__(
            name=f"classes{len(class_ids)}_{fingerprint}",
            description=f"CUB folder with {len(class_ids)} classes, index fingerprint {fingerprint}.",
        )
        self.class_ids = tuple(int(c) for c in class_ids)
        self.class_names = tuple(class_names)
        self.fingerprint = fingerprint

    @classmethod
    def from_folder(cls, manual_dir: str) -> "CubFolderConfig":
        index = read_cub_index(manual_dir)
        return cls(
            class_ids=index.present_class_ids,
            class_names=index.present_class_names,
            fingerprint=index_fingerprint(manual_dir),
        )


class CubFolder(tfds.core.GeneratorBasedBuilder):
    """CUB-200-2011 (or a subset in the same layout) read from a local folder given as manual_dir.

    Use `CubFolder(config=CubFolderConfig.from_folder(manual_dir), data_dir=..., file_format="array_record")`
    or simply `load_cub_sources`.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: reads an extracted CUB_200_2011/ folder."}
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
        manual_dir = os.fspath(dl_manager.manual_dir)
        index = read_cub_index(manual_dir)
        if index_fingerprint(manual_dir) != self.builder_config.fingerprint:
            raise ValueError(f"CUB folder {manual_dir!r} changed since its config was made; rebuild the config.")
        for split in SPLITS:
            if (split == "train") not in index.is_train:
                raise _layout_error(manual_dir, f"train_test_split.txt leaves the {split} split empty")
        return {split: self._generate_examples(manual_dir, index, split) for split in SPLITS}

    def _generate_examples(self, manual_dir: str, index: CubIndex, split: str):
        label_of_class = {class_id: label for label, class_id in enumerate(index.present_class_ids)}
        skipped: list[str] = []
        for image_id, file_name, class_id, is_train in zip(
            index.image_ids, index.file_names, index.class_ids, index.is_train
        ):
            if is_train != (split == "train"):
                continue
            jpeg = as_rgb_jpeg_bytes(os.path.join(manual_dir, "images", file_name))
            if jpeg is None:
                skipped.append(file_name)
                continue
            yield image_id, {
                "image": jpeg,
                "label": label_of_class[class_id],
                "class_id": class_id,
                "image_id": image_id,
                "file_name": file_name,
            }
        self.info.metadata[f"skipped_{split}"] = skipped
        if skipped and len(skipped) == sum(flag == (split == "train") for flag in index.is_train):
            # Otherwise TFDS fails with a bare 'No examples were yielded' assertion.
            raise _layout_error(
                manual_dir,
                f"none of the {len(skipped)} {split} images listed in images.txt could be read from images/ "
                f"(missing or undecodable, e.g. {skipped[0]!r})",
            )
        if skipped:
            _LOG.warning(
                "CUB %s split: skipped %d undecodable images: %s",
                split, len(skipped), ", ".join(skipped[:_SKIPPED_NAMES_SHOWN]),
            )


@dataclasses.dataclass(frozen=True)
class CubSourceInfo:
    """What the trainer needs to know about a loaded CUB build."""

    num_classes: int
    class_ids: tuple[int, ...]  # original CUB id of each label
    class_names: tuple[str, ...]
    split_sizes: Mapping[str, int]
    skipped_files: Mapping[str, tuple[str, ...]]  # per split: undecodable images left out at build time
    builder_dir: str


def load_cub_sources(manual_dir: str, data_dir: str) -> tuple[dict[str, Sequence[dict]], CubSourceInfo]:
    """Builds the folder into `data_dir` on first use (reused afterwards) and opens random-access sources.

    Each source element is a dict: image uint8 [H,W,3] (decoded with PIL), label int64 in 0..C-1,
    class_id, image_id, file_name (bytes). Pass workdir/tfds or $TFDS_DATA_DIR as data_dir.
    """
    builder = CubFolder(
        config=CubFolderConfig.from_folder(manual_dir), data_dir=data_dir, file_format="array_record"
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    )
    info = builder.info
    split_sizes = {split: info.splits[split].num_examples for split in SPLITS}
    empty = [split for split, size in split_sizes.items() if size == 0]
    if empty:
        raise ValueError(f"CUB folder {manual_dir!r}: no decodable images in split(s) {empty}; {EXPECTED_LAYOUT}.")
    config = builder.builder_config
    info_out = CubSourceInfo(
        num_classes=len(config.class_ids),
        class_ids=config.class_ids,
        class_names=config.class_names,
        split_sizes=split_sizes,
        skipped_files={split: tuple(info.metadata.get(f"skipped_{split}", ())) for split in SPLITS},
        builder_dir=os.fspath(builder.data_dir),
    )
    return {split: builder.as_data_source(split) for split in SPLITS}, info_out
