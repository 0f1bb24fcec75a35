"""CUB-200-2011's reader: its official index files to a `records.DataIndex` (the shared builder does the rest).

Layout (the extracted CUB_200_2011.tgz; its README): `images.txt` (`<image id> <class folder>/<file>.jpg`),
`image_class_labels.txt` (`<image id> <class id>`), `train_test_split.txt` (`<image id> <1: train, 0: test>`),
`classes.txt` (`<class id> <name>`), `images/<class folder>/<file>.jpg`, and, in the full release,
`bounding_boxes.txt` (`<image id> <x> <y> <width> <height>`, pixels from the top-left corner; read when present,
stored as (x, y, x + width, y + height)). A subset in the same layout works too (the shared 100-class one):
labels are the classes present, in order of original id, so the label set depends on the folder.

Index files are UTF-8, with or without the byte order mark Windows editors (Notepad, Excel) write. Every
contradiction in them (an id on two lines, an image listed twice, ids that differ between files, a class
without a name) is a one-line error before anything is built.
"""

from __future__ import annotations

import os
import unicodedata

from fgpair_jax.data import records
from fgpair_jax.errors import DataError, MissingFileError

INDEX_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
BOXES_FILE = "bounding_boxes.txt"
EXPECTED_LAYOUT = (
    "expected the extracted official CUB_200_2011/ folder with images.txt, image_class_labels.txt, "
    "train_test_split.txt, classes.txt and images/<class>/<file>.jpg; set config.data.manual_dir to it"
)


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


def read_index(manual_dir: str, data_config=None) -> records.DataIndex:
    """Reads and cross-checks the index files (and `bounding_boxes.txt` when present); raises one clear
    `DataError`/`MissingFileError` naming the layout if anything is off. `data_config` is unused (CUB has no
    knobs of its own)."""
    del data_config
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
    image_ids = sorted(images)
    present = tuple(sorted({int(labels[i]) for i in image_ids}))
    unnamed = [c for c in present if c not in classes]
    if unnamed:
        raise _layout_error(manual_dir, f"class ids {unnamed[:5]} are used but missing from classes.txt")
    for flag, name in (("1", "train"), ("0", "test")):
        if flag not in split.values():
            raise _layout_error(manual_dir, f"train_test_split.txt leaves the {name} split empty")
    boxes = _read_boxes(manual_dir, images)
    label_of_class = {class_id: label for label, class_id in enumerate(present)}
    return records.DataIndex(
        data_set="CUB folder",
        manual_dir=manual_dir,
        images_dir=os.path.join(manual_dir, "images"),
        records=tuple(
            records.ImageRecord(image_id=i, file_name=images[i], label=label_of_class[int(labels[i])],
                                split="train" if split[i] == "1" else "test", box=boxes.get(i))
            for i in image_ids
        ),
        class_names=tuple(classes[c] for c in present),
        class_ids=present,
        listed_in="images.txt",
        expected_layout=EXPECTED_LAYOUT,
    )


def _read_boxes(manual_dir: str, images: dict) -> dict[int, records.Box]:
    """{image id: (x, y, x + width, y + height)} from `bounding_boxes.txt`, or {} when the folder has none (the
    shared subset). Present, it must give four non-negative numbers with positive width and height for every
    image of images.txt: a one-line error otherwise."""
    if not os.path.exists(os.path.join(manual_dir, BOXES_FILE)):
        return {}
    table, line_of = _read_id_table(manual_dir, BOXES_FILE)
    missing = sorted(images.keys() - table.keys())
    if missing:
        raise _layout_error(manual_dir, f"{BOXES_FILE} has no box for image ids {missing[:5]}")
    boxes = {}
    for image_id in images:
        try:
            x, y, width, height = (float(value) for value in table[image_id].split())
        except ValueError:
            x = y = width = height = -1.0
        if min(x, y) < 0 or width <= 0 or height <= 0:
            raise _layout_error(manual_dir, f"{BOXES_FILE} line {line_of[image_id]} is not '<id> <x> <y> <width> "
                                            f"<height>' with a non-empty box")
        boxes[image_id] = (x, y, x + width, y + height)
    return boxes


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


DATA_SET = records.DataSet(
    name="cub",
    read_index=read_index,
    expected_layout=EXPECTED_LAYOUT,
    marker="images.txt",
    manual_download=(
        "download CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ (or set "
        "config.data.download=True) and set config.data.manual_dir to the archive or its extracted CUB_200_2011/"
    ),
    download=records.Download(
        url="https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
        file_name="CUB_200_2011.tgz",
        md5="97eceeb196236b17998738112f37df78",
        checksum_source=("the MD5 torchvision-style CUB readers pin for CUB_200_2011.tgz (e.g. the tgz_md5 of "
                         "widely used CUB2011 ImageFolder readers); CaltechDATA lists the file's MD5 on its record "
                         "page, which we could not open from here"),
    ),
    official_files=("CUB_200_2011.tgz",),
)
