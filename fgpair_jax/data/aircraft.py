"""Reader of FGVC-Aircraft 2013b (variant level): index parsing only (see `records.py`).

Layout (`config.data.manual_dir` is the extracted `fgvc-aircraft-2013b/` folder):

    data/images/<id>.jpg                     10,000 images; <id> is seven digits (0034309.jpg)
    data/variants.txt                        the variant names, one a line, in the official order
    data/images_variant_<split>.txt          '<id> <variant name>' lines for split in train, val, trainval, test;
                                             the name runs to the end of the line and may hold spaces and '/'
                                             ("Boeing 737-700", "F/A-18")
    data/images_box.txt                      '<id> xmin ymin xmax ymax', one box per image (optional here)

Splits: the training split is `config.data.aircraft_train_split`, "trainval" (default: the official train and
val images, the usual fine-grained protocol) or "train"; the test split is images_variant_test.txt. Labels are
at the variant level: label = line position of the name in variants.txt (0-based), class_names verbatim,
class_ids = 1..C (the 1-based line position). image_id = int(<id>), file_name = "<id>.jpg" relative to
images_dir = manual_dir/data/images.

Boxes: the README says the top-left pixel has coordinate (1,1); xmax and ymax are read as inclusive (the last
column and row of the aircraft), so Box = (xmin - 1, ymin - 1, xmax, ymax) as floats, the 0-based edge
convention of `records.Box`. Without images_box.txt every box is None; with it, every listed image must have one.
The boxes are in the coordinates of the full image, banner included.

Copyright banner: every image has a banner `BANNER_ROWS` = 20 pixels high at its bottom, which the README asks
users to remove. This reader does not (it never opens an image); the builder crops it at read time. The banner
is at the bottom, so the crop moves no box, but a box reaching into the banner must be clipped by that crop.

Where each detail was checked (public sources, read, not copied):
- The data format: the data set's own README.md (copy in glhr/ood-labelnoise,
  data/images_classic/fgvc-aircraft-2013b/README.md, "Below is the official README.md"): data/images/ with
  seven-digit names, "a banner 20 pixels high" at the bottom, images_variant_{train,val,test}.txt lines
  '<image> <label>', images_box.txt "xmin, ymin, xmax and ymax. The top-left pixel of an image has
  coordinate (1,1)", and the download link with its "MD5 Sum" page.
- trainval split file, variants.txt as the class list in file order, the '<id> <name>' split at the first
  space, the archive's top folder fgvc-aircraft-2013b/: torchvision `FGVCAircraft` (pytorch/vision,
  torchvision/datasets/fgvc_aircraft.py), which reads data/variants.txt line by line (stripped) and
  data/images_variant_<split>.txt for split in train, val, trainval, test.
- 100 variants in variants.txt (the project page describes 102 variants and 10,200 images; the 2013b lists
  hold 100 and 10,000): mlverse/torchvision
  R/dataset-fgvc.R ("There are 100 visually distinguishable variants"). Names with '/': the Meta-Dataset split
  lists ('F/A-18', 'F-16A/B').
- The archive's MD5 (see `DATA_SET.download.checksum_source`): pinned as d4acdd33... by mlverse/torchvision
  R/dataset-fgvc.R and google-deepmind/dm_nevis dm_nevis/datasets_storage/handlers/fgvc_aircraft.py.

Not verifiable without the real files: that xmax/ymax are inclusive (the README gives only the origin); that
no real box reaches below the banner or outside the image; the exact line endings (CRLF is accepted); that the
MD5 above is what the official "MD5 Sum" page says (that page could not be read here).
"""

from __future__ import annotations

import math
import os
import re

from fgpair_jax.data import records
from fgpair_jax.errors import ConfigError, DataError, MissingFileError

EXPECTED_LAYOUT = (
    "expected the extracted official fgvc-aircraft-2013b/ folder with data/images/<id>.jpg, data/variants.txt, "
    "data/images_variant_trainval.txt (or _train.txt), data/images_variant_test.txt and data/images_box.txt; set "
    "config.data.manual_dir to it"
)
DATA_SET_NAME = "FGVC-Aircraft folder"
VARIANTS = "data/variants.txt"
BOXES = "data/images_box.txt"
IMAGES = "data/images"
TRAIN_SPLITS = ("trainval", "train")
DEFAULT_TRAIN_SPLIT = "trainval"
TRAIN_SPLIT_KEY = "aircraft_train_split"
# Rows of copyright banner at the bottom of every image: the data set's README ("Each image has at the bottom a
# banner 20 pixels high containing copyright information. Please make sure to remove this banner ...").
BANNER_ROWS = 20
_IMAGE_ID = re.compile(r"[0-9]{7}")


def split_file(split: str) -> str:
    """'data/images_variant_<split>.txt': the variant labels of the official split `split`."""
    return f"data/images_variant_{split}.txt"


def _layout_error(manual_dir: str, problem: str) -> DataError:
    return DataError(f"{DATA_SET_NAME} {manual_dir!r}: {problem}; {EXPECTED_LAYOUT}.")


def _index_error(manual_dir: str, problem: str) -> DataError:
    """An index file contradicts itself or another one: one line; nothing has been built yet."""
    return DataError(f"{DATA_SET_NAME} {manual_dir!r}: {problem}. Correct the index file (nothing was built).")


def train_split(data_config) -> str:
    """`config.data.aircraft_train_split` ("trainval" when absent or None); `ConfigError` for another value."""
    value = getattr(data_config, TRAIN_SPLIT_KEY, None) if data_config is not None else None
    if value is None:
        return DEFAULT_TRAIN_SPLIT
    if value not in TRAIN_SPLITS:
        raise ConfigError(f"config.data.{TRAIN_SPLIT_KEY}={value!r} is not one of {', '.join(map(repr, TRAIN_SPLITS))}"
                          f" ('trainval' trains on the official train and val images, 'train' on train only).")
    return value


def _check_folder(manual_dir: str, split_files: tuple[str, ...]) -> None:
    """One-line error naming what is wrong with the folder itself, before any index file is read: missing, a file,
    empty, or missing parts, with a hint for the usual slips (the parent of fgvc-aircraft-2013b/, its data/
    folder, the annotations-only archive)."""
    if not manual_dir or not os.path.isdir(manual_dir):
        problem = "is a file, not a folder" if manual_dir and os.path.exists(manual_dir) else "does not exist"
        raise MissingFileError(f"{DATA_SET_NAME} {manual_dir!r} {problem}; {EXPECTED_LAYOUT}.")
    try:
        entries = sorted(os.listdir(manual_dir))
    except OSError as error:
        raise _layout_error(manual_dir, f"cannot be listed ({error.strerror or type(error).__name__})") from None
    if not entries:
        raise MissingFileError(f"{DATA_SET_NAME} {manual_dir!r} is empty; {EXPECTED_LAYOUT}.")
    needed = (VARIANTS, *split_files, IMAGES)
    missing = [name for name in needed if not os.path.exists(os.path.join(manual_dir, name))]
    if not missing:
        return
    nested = [name for name in entries if os.path.isfile(os.path.join(manual_dir, name, VARIANTS))]
    if nested:
        hint = f" (its subfolder {nested[0]!r} holds a {VARIANTS}: point there)"
    elif os.path.isfile(os.path.join(manual_dir, os.path.basename(VARIANTS))):
        hint = " (it holds variants.txt itself: it looks like the data/ folder; point at the folder above it)"
    elif missing == [IMAGES]:
        hint = " (the annotations-only archive has no images: extract fgvc-aircraft-2013b.tar.gz)"
    else:
        hint = ""
    raise MissingFileError(f"{DATA_SET_NAME} {manual_dir!r} lacks {', '.join(missing)}{hint}; {EXPECTED_LAYOUT}.")


def _read_lines(manual_dir: str, name: str) -> list[tuple[int, str]]:
    """(line number, line without its end) for every non-blank line of the UTF-8 text file `name` (a byte order
    mark is dropped); a file that cannot be read or is not UTF-8 is a one-line layout error."""
    try:
        with open(os.path.join(manual_dir, name), encoding="utf-8-sig") as handle:
            return [(number, line.rstrip("\r\n")) for number, line in enumerate(handle, start=1) if line.strip()]
    except UnicodeDecodeError as error:
        raise _layout_error(manual_dir, f"{name} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise _layout_error(manual_dir, f"{name} cannot be read ({error.strerror or type(error).__name__})") from None


def _read_variants(manual_dir: str) -> tuple[str, ...]:
    """variants.txt's names in file order, each stripped of surrounding white space, otherwise verbatim."""
    names: list[str] = []
    line_of: dict[str, int] = {}
    for number, line in _read_lines(manual_dir, VARIANTS):
        name = line.strip()
        if name in line_of:
            raise _layout_error(manual_dir, f"{VARIANTS} line {number} repeats variant {name!r} of line "
                                            f"{line_of[name]}")
        line_of[name] = number
        names.append(name)
    if not names:
        raise _layout_error(manual_dir, f"{VARIANTS} lists no variants")
    return tuple(names)


def _read_split(manual_dir: str, name: str, label_of: dict[str, int]) -> dict[str, tuple[int, int]]:
    """{image id string: (label, line number)} from one images_variant_<split>.txt."""
    listed: dict[str, tuple[int, int]] = {}
    for number, line in _read_lines(manual_dir, name):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not _IMAGE_ID.fullmatch(parts[0]):
            raise _layout_error(manual_dir, f"{name} line {number} is not '<7-digit image id> <variant name>'")
        image, variant = parts[0], parts[1].strip()
        if variant not in label_of:
            raise _index_error(manual_dir, f"{name} line {number}: variant {variant!r} of image {image} is not in "
                                           f"{VARIANTS}")
        if image in listed:
            raise _index_error(manual_dir, f"{name} line {number} repeats image {image} of line {listed[image][1]}")
        listed[image] = (label_of[variant], number)
    if not listed:
        raise _layout_error(manual_dir, f"{name} lists no images")
    return listed


def _read_boxes(manual_dir: str) -> dict[str, tuple[records.Box, int]] | None:
    """{image id string: (box, line number)} from images_box.txt, or None when the file is absent."""
    if not os.path.exists(os.path.join(manual_dir, BOXES)):
        return None
    boxes: dict[str, tuple[records.Box, int]] = {}
    for number, line in _read_lines(manual_dir, BOXES):
        parts = line.split()
        corners = None
        if len(parts) == 5 and _IMAGE_ID.fullmatch(parts[0]):
            try:
                corners = [float(part) for part in parts[1:]]
            except ValueError:
                corners = None
        if corners is None or not all(math.isfinite(corner) for corner in corners):
            raise _layout_error(manual_dir, f"{BOXES} line {number} is not '<7-digit image id> xmin ymin xmax ymax'")
        image = parts[0]
        if image in boxes:
            raise _index_error(manual_dir, f"{BOXES} line {number} repeats image {image} of line {boxes[image][1]}")
        xmin, ymin, xmax, ymax = corners
        if xmax < xmin or ymax < ymin:
            raise _index_error(manual_dir, f"{BOXES} line {number} has a reversed box for image {image} "
                                           f"(x {xmin:g}..{xmax:g}, y {ymin:g}..{ymax:g})")
        boxes[image] = ((xmin - 1.0, ymin - 1.0, xmax, ymax), number)
    return boxes


def read_index(manual_dir: str, data_config=None) -> records.DataIndex:
    """Reads and cross-checks the index files; one-line `DataError`/`MissingFileError` naming the layout if
    anything is off, `ConfigError` for a bad `config.data.aircraft_train_split`."""
    train_name, test_name = split_file(train_split(data_config)), split_file("test")
    _check_folder(manual_dir, (train_name, test_name))
    class_names = _read_variants(manual_dir)
    label_of = {name: label for label, name in enumerate(class_names)}
    listed = {"train": _read_split(manual_dir, train_name, label_of),
              "test": _read_split(manual_dir, test_name, label_of)}
    for image, (_, test_line) in listed["test"].items():
        if image in listed["train"]:
            raise _index_error(manual_dir, f"image {image} is listed in both {train_name} line "
                                           f"{listed['train'][image][1]} and {test_name} line {test_line}")
    boxes = _read_boxes(manual_dir)
    out = []
    for split, names in (("train", train_name), ("test", test_name)):
        for image, (label, number) in listed[split].items():
            box = None
            if boxes is not None:
                if image not in boxes:
                    raise _index_error(manual_dir, f"{BOXES} has no box for image {image} ({names} line {number})")
                box = boxes[image][0]
            out.append(records.ImageRecord(image_id=int(image), file_name=f"{image}.jpg", label=label, split=split,
                                           box=box))
    return records.DataIndex(
        data_set=DATA_SET_NAME,
        manual_dir=manual_dir,
        images_dir=os.path.join(manual_dir, IMAGES),
        records=tuple(sorted(out, key=lambda record: record.image_id)),
        class_names=class_names,
        class_ids=tuple(range(1, len(class_names) + 1)),
        listed_in=f"{train_name} and {test_name}",
        expected_layout=EXPECTED_LAYOUT,
    )


DATA_SET = records.DataSet(
    name="aircraft",
    read_index=read_index,
    expected_layout=EXPECTED_LAYOUT,
    marker=VARIANTS,
    manual_download=(
        "Download fgvc-aircraft-2013b.tar.gz (2.75 GB, data, annotations and evaluation code) from "
        "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/, extract it, and set config.data.manual_dir to the "
        "fgvc-aircraft-2013b/ folder it creates."
    ),
    download=records.Download(
        url="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
        file_name="fgvc-aircraft-2013b.tar.gz",
        md5="d4acdd33327262359767eeaa97a4f732",
        checksum_source=(
            "the MD5 that mlverse/torchvision (R/dataset-fgvc.R, fgvc_aircraft_dataset) and google-deepmind/dm_nevis "
            "(dm_nevis/datasets_storage/handlers/fgvc_aircraft.py) pin for this URL; the official page links its own "
            "'MD5 Sum' page (archives/fgvc-aircraft-2013b.html), which was not read here"
        ),
    ),
    official_files=("fgvc-aircraft-2013b.tar.gz",),
)
