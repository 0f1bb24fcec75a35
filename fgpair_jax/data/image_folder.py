"""A class-per-folder reader (`train/<class>/...`, `test/<class>/...`): any other fine-grained set, or a converted
one, trains without a reader of its own.

This is the layout torchvision's `ImageFolder` reads and LCR (GANPerf/LCR, `main_moco.py`/`main_lincls.py`)
trains and evaluates on: class names are the sub-folder names of `train/`, sorted (as `ImageFolder.find_classes`
sorts them), and a class's label is its position in that order; images are found recursively under each class
folder, following symlinks, with the extensions `ImageFolder` accepts (`IMG_EXTENSIONS`, any letter case); hidden
files and folders (a leading '.', e.g. macOS `._x.jpg`) are not images. A class folder of `test/` must also be a
class of `train/` (its label would mean nothing to the linear probe); a class of `train/` with no test images is
fine. Image ids are positions in the sorted listing, train first. No boxes.
"""

from __future__ import annotations

import os

from fgpair_jax.data import records
from fgpair_jax.errors import DataError, MissingFileError

# torchvision.datasets.folder.IMG_EXTENSIONS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
EXPECTED_LAYOUT = (
    "expected a class-per-folder layout (as torchvision's ImageFolder and LCR read it): train/<class>/<image> and "
    "test/<class>/<image>; set config.data.manual_dir to the folder holding train/ and test/"
)


def _error(manual_dir: str, problem: str, kind=DataError) -> Exception:
    return kind(f"Image folder {manual_dir!r}: {problem}; {EXPECTED_LAYOUT}.")


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _class_folders(manual_dir: str, split: str) -> list[str]:
    """The sorted class folder names of `<manual_dir>/<split>/` (a one-line error if it is missing or has none)."""
    split_dir = os.path.join(manual_dir, split)
    if not os.path.isdir(split_dir):
        nested = sorted(name for name in os.listdir(manual_dir)
                        if os.path.isdir(os.path.join(manual_dir, name, split)))
        hint = f" (its subfolder {nested[0]!r} holds a {split}/: point there)" if nested else ""
        raise _error(manual_dir, f"has no {split}/ folder{hint}", MissingFileError)
    classes = sorted(name for name in os.listdir(split_dir)
                     if _visible(name) and os.path.isdir(os.path.join(split_dir, name)))
    if not classes:
        loose = [name for name in os.listdir(split_dir) if name.lower().endswith(IMAGE_EXTENSIONS)]
        hint = f" (it holds images directly, e.g. {loose[0]!r}: put each class's images in a folder of its own)" \
            if loose else ""
        raise _error(manual_dir, f"{split}/ has no class folders{hint}")
    return classes


def _images_of(manual_dir: str, split: str, class_name: str) -> list[str]:
    """'/'-separated names relative to manual_dir of the class's images, sorted, found recursively."""
    found = []
    class_dir = os.path.join(manual_dir, split, class_name)
    for top, folders, files in os.walk(class_dir, followlinks=True):
        folders[:] = sorted(name for name in folders if _visible(name))
        for name in sorted(files):
            if _visible(name) and name.lower().endswith(IMAGE_EXTENSIONS):
                relative = os.path.relpath(os.path.join(top, name), manual_dir)
                found.append(relative.replace(os.sep, "/"))
    return found


def read_index(manual_dir: str, data_config=None) -> records.DataIndex:
    """Lists `train/` and `test/` (see the module docstring); one-line `MissingFileError`/`DataError` naming the
    layout for a missing folder, a split without class folders or images, or a test class not in train.
    `data_config` is unused."""
    del data_config
    if not manual_dir or not os.path.isdir(manual_dir):
        problem = "is a file, not a folder" if manual_dir and os.path.exists(manual_dir) else "does not exist"
        raise _error(manual_dir, problem, MissingFileError)
    classes = _class_folders(manual_dir, "train")
    test_classes = _class_folders(manual_dir, "test")
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        raise _error(manual_dir, f"test/ has class folders that train/ lacks: {unknown[:5]}")
    label_of = {name: label for label, name in enumerate(classes)}
    listed = []
    for split, split_classes in (("train", classes), ("test", test_classes)):
        names = [(name, label_of[class_name]) for class_name in split_classes
                 for name in _images_of(manual_dir, split, class_name)]
        if not names:
            raise _error(manual_dir, f"{split}/ holds no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
        listed += [(name, label, split) for name, label in names]
    return records.DataIndex(
        data_set="Image folder",
        manual_dir=manual_dir,
        images_dir=manual_dir,
        records=tuple(records.ImageRecord(image_id=i, file_name=name, label=label, split=split)
                      for i, (name, label, split) in enumerate(listed)),
        class_names=tuple(classes),
        class_ids=tuple(range(len(classes))),
        listed_in="train/ and test/",
        expected_layout=EXPECTED_LAYOUT,
    )


DATA_SET = records.DataSet(
    name="image_folder",
    read_index=read_index,
    expected_layout=EXPECTED_LAYOUT,
    marker="train",
    manual_download="put your images in train/<class>/ and test/<class>/ and set config.data.manual_dir to that folder",
)
