"""Tests for the Stanford Cars reader (`fgpair_jax.data.cars`): a tiny folder in the authors' layout, written
with .mat files shaped like the real ones (1xN struct arrays, 1x1 numeric fields, a 1xC cell of names)."""

import os

import numpy as np
import pytest
import scipy.io
from PIL import Image

from fgpair_jax.data import cars
from fgpair_jax.errors import DataError, MissingFileError

CLASSES = ("AM General Hummer SUV 2000", "Ram C/V Cargo Van Minivan 2012", "smart fortwo Convertible 2012")
# (fname, class id, (x1, y1, x2, y2) 1-based inclusive)
TRAIN = [("00001.jpg", 2, (1, 2, 10, 12)), ("00002.jpg", 1, (3, 4, 16, 9)), ("00003.jpg", 3, (5, 1, 5, 1))]
TEST = [("00001.jpg", 3, (2, 2, 8, 8)), ("00002.jpg", 2, (1, 1, 16, 12))]


def _annotations(rows, fields=cars.FIELDS):
    """A 1xN struct array like the devkit's: uint8/uint16 1x1 numbers, fname a 1-element char array."""
    array = np.zeros((1, len(rows)), dtype=[(field, object) for field in fields])
    for column, (fname, class_id, (x1, y1, x2, y2)) in enumerate(rows):
        values = {"bbox_x1": np.array([[x1]], np.uint16), "bbox_y1": np.array([[y1]], np.uint16),
                  "bbox_x2": np.array([[x2]], np.uint16), "bbox_y2": np.array([[y2]], np.uint16),
                  "class": np.array([[class_id]], np.uint8), "fname": np.array([fname])}
        array[0, column] = tuple(values[field] for field in fields)
    return array


def _class_cell(names):
    cell = np.empty((1, len(names)), dtype=object)
    for position, name in enumerate(names):
        cell[0, position] = np.array([name])
    return cell


def write_cars(root, train=TRAIN, test=TEST, classes=CLASSES, test_place=cars.TEST_ANNOS):
    """The authors' layout under `root`; `test_place` is where the labelled test annotations go (None: nowhere)."""
    os.makedirs(os.path.join(root, "devkit"))
    for folder, rows in (("cars_train", train), ("cars_test", test)):
        os.makedirs(os.path.join(root, folder))
        for fname, _, _ in rows:
            Image.new("RGB", (16, 12), (40, 90, 160)).save(os.path.join(root, folder, fname), format="JPEG")
    scipy.io.savemat(os.path.join(root, cars.META), {"class_names": _class_cell(classes)})
    scipy.io.savemat(os.path.join(root, cars.TRAIN_ANNOS), {"annotations": _annotations(train)})
    # The devkit's own test file: the same struct without the class field.
    unlabelled = _annotations(test, fields=tuple(f for f in cars.FIELDS if f != "class"))
    scipy.io.savemat(os.path.join(root, cars.UNLABELLED_TEST_ANNOS), {"annotations": unlabelled})
    if test_place is not None:
        scipy.io.savemat(os.path.join(root, test_place), {"annotations": _annotations(test)})
    return root


def _message(error_info, root) -> str:
    message = str(error_info.value)
    assert "\n" not in message, message
    assert repr(root) in message, message
    return message


def test_reads_labels_splits_boxes_and_ids(tmp_path):
    root = write_cars(str(tmp_path / "cars"))
    index = cars.read_index(root)
    assert index.class_names == CLASSES  # verbatim, '/' and spaces kept, cars_meta order
    assert index.class_ids == (1, 2, 3)
    assert index.images_dir == root and index.manual_dir == root
    assert index.data_set == "Stanford Cars folder" and index.expected_layout == cars.EXPECTED_LAYOUT
    assert index.listed_in == "devkit/cars_train_annos.mat and cars_test_annos_withlabels.mat"
    ids = [record.image_id for record in index.records]
    assert ids == sorted(ids) == [1, 2, 3, 100_001, 100_002] and len(set(ids)) == len(ids)
    by_split = {split: [r for r in index.records if r.split == split] for split in ("train", "test")}
    assert [len(by_split["train"]), len(by_split["test"])] == [3, 2]
    assert [r.file_name for r in by_split["train"]] == ["cars_train/00001.jpg", "cars_train/00002.jpg",
                                                        "cars_train/00003.jpg"]
    assert [r.file_name for r in by_split["test"]] == ["cars_test/00001.jpg", "cars_test/00002.jpg"]
    assert [r.label for r in index.records] == [1, 0, 2, 2, 1]  # class id - 1
    assert index.class_names[by_split["train"][0].label] == "Ram C/V Cargo Van Minivan 2012"
    # 1-based inclusive corners -> 0-based edges: a one-pixel box at (5, 1) covers columns 4..5, rows 0..1.
    assert by_split["train"][0].box == (0.0, 1.0, 10.0, 12.0)
    assert by_split["train"][2].box == (4.0, 0.0, 5.0, 1.0)
    assert by_split["test"][1].box == (0.0, 0.0, 16.0, 12.0)
    assert all(isinstance(v, float) for r in index.records for v in r.box)
    assert index.has_boxes
    assert all(os.path.isfile(os.path.join(index.images_dir, r.file_name)) for r in index.records)


def test_labelled_test_annotations_in_devkit(tmp_path):
    root = write_cars(str(tmp_path / "cars"), test_place=f"devkit/{cars.TEST_ANNOS}")
    index = cars.read_index(root, None)
    assert index.listed_in == "devkit/cars_train_annos.mat and devkit/cars_test_annos_withlabels.mat"
    assert [(r.image_id, r.label) for r in index.records if r.split == "test"] == [(100_001, 2), (100_002, 1)]


def test_top_labelled_test_annotations_win_over_devkit(tmp_path):
    root = write_cars(str(tmp_path / "cars"))
    other = [("00001.jpg", 1, (2, 2, 8, 8)), ("00002.jpg", 1, (1, 1, 16, 12))]
    scipy.io.savemat(os.path.join(root, "devkit", cars.TEST_ANNOS), {"annotations": _annotations(other)})
    index = cars.read_index(root)
    assert [r.label for r in index.records if r.split == "test"] == [2, 1]


def test_one_image_per_split_and_one_class(tmp_path):
    """A 1x1 struct array and a 1x1 cell read like longer ones (no squeezing to a scalar)."""
    root = write_cars(str(tmp_path / "cars"), train=[("a.jpg", 1, (1, 1, 4, 4))], test=[("b.jpg", 1, (1, 1, 2, 2))],
                      classes=("Only Class 2012",))
    index = cars.read_index(root)
    assert index.class_names == ("Only Class 2012",) and index.class_ids == (1,)
    assert [(r.image_id, r.file_name, r.label, r.box) for r in index.records] == [
        (1, "cars_train/a.jpg", 0, (0.0, 0.0, 4.0, 4.0)), (100_001, "cars_test/b.jpg", 0, (0.0, 0.0, 2.0, 2.0))]


def test_only_unlabelled_test_annotations_say_which_file_is_needed(tmp_path):
    root = write_cars(str(tmp_path / "cars"), test_place=None)
    with pytest.raises(MissingFileError) as error:
        cars.read_index(root)
    message = _message(error, root)
    assert "devkit/cars_test_annos.mat" in message and "no test labels" in message
    assert "the labelled cars_test_annos_withlabels.mat" in message
    assert "at the top of the folder or in devkit/" in message
    assert message.endswith(f"{cars.EXPECTED_LAYOUT}.") and "config.data.manual_dir" in message


def test_no_test_annotations_at_all(tmp_path):
    root = write_cars(str(tmp_path / "cars"), test_place=None)
    os.remove(os.path.join(root, cars.UNLABELLED_TEST_ANNOS))
    with pytest.raises(MissingFileError) as error:
        cars.read_index(root)
    message = _message(error, root)
    assert "lacks cars_test_annos_withlabels.mat" in message and "devkit/" in message


def _rewrite(root, name, variables):
    scipy.io.savemat(os.path.join(root, name), variables)


@pytest.mark.parametrize("case, words", [
    ("repeated fname", ["devkit/cars_train_annos.mat", "annotations 1 and 4", "'00001.jpg'", "nothing was built"]),
    ("class zero", ["devkit/cars_train_annos.mat", "annotation 2", "class 0", "outside 1..3"]),
    ("class too large", ["cars_test_annos_withlabels.mat", "annotation 1", "class 4", "outside 1..3"]),
    ("missing field", ["devkit/cars_train_annos.mat", "lack the field(s) bbox_y2"]),
    ("labelled file without class", ["cars_test_annos_withlabels.mat", "no class field", "labelled"]),
    ("reversed box", ["devkit/cars_train_annos.mat", "annotation 1", "reversed box"]),
    ("not a mat file", ["devkit/cars_meta.mat", "cannot be read as a MATLAB .mat file"]),
    ("no class_names", ["devkit/cars_meta.mat", "no variable 'class_names'"]),
    ("empty annotations", ["devkit/cars_train_annos.mat", "lists no images"]),
    ("path in fname", ["devkit/cars_train_annos.mat", "annotation 1", "not a file name"]),
])
def test_bad_annotations_are_one_line_errors(tmp_path, case, words):
    root = write_cars(str(tmp_path / "cars"))
    if case == "repeated fname":
        _rewrite(root, cars.TRAIN_ANNOS, {"annotations": _annotations(TRAIN + [("00001.jpg", 1, (1, 1, 2, 2))])})
    elif case == "class zero":
        _rewrite(root, cars.TRAIN_ANNOS, {"annotations": _annotations([TRAIN[0], ("00002.jpg", 0, (1, 1, 2, 2))])})
    elif case == "class too large":
        _rewrite(root, cars.TEST_ANNOS, {"annotations": _annotations([("00001.jpg", 4, (1, 1, 2, 2))])})
    elif case == "missing field":
        fields = tuple(f for f in cars.FIELDS if f != "bbox_y2")
        _rewrite(root, cars.TRAIN_ANNOS, {"annotations": _annotations(TRAIN, fields=fields)})
    elif case == "labelled file without class":
        fields = tuple(f for f in cars.FIELDS if f != "class")
        _rewrite(root, cars.TEST_ANNOS, {"annotations": _annotations(TEST, fields=fields)})
    elif case == "reversed box":
        _rewrite(root, cars.TRAIN_ANNOS, {"annotations": _annotations([("00001.jpg", 1, (9, 1, 3, 4))])})
    elif case == "not a mat file":
        with open(os.path.join(root, cars.META), "wb") as handle:
            handle.write(b"<html>404 Not Found</html>\n" * 20)
    elif case == "no class_names":
        _rewrite(root, cars.META, {"names": _class_cell(CLASSES)})
    elif case == "empty annotations":
        _rewrite(root, cars.TRAIN_ANNOS, {"annotations": _annotations([])})
    elif case == "path in fname":
        _rewrite(root, cars.TRAIN_ANNOS, {"annotations": _annotations([("../x.jpg", 1, (1, 1, 2, 2))])})
    with pytest.raises(DataError) as error:
        cars.read_index(root)
    message = _message(error, root)
    for word in words:
        assert word in message, (word, message)


def test_folder_problems_are_one_line_errors(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(MissingFileError) as error:
        cars.read_index(missing)
    assert "does not exist" in _message(error, missing) and "config.data.manual_dir" in str(error.value)

    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    with pytest.raises(MissingFileError) as error:
        cars.read_index(empty)
    assert "is empty" in _message(error, empty)

    parent = str(tmp_path / "parent")
    write_cars(os.path.join(parent, "stanford_cars"))
    with pytest.raises(MissingFileError) as error:
        cars.read_index(parent)
    message = _message(error, parent)
    assert "lacks cars_train, cars_test, devkit/cars_meta.mat" in message
    assert "subfolder 'stanford_cars'" in message and "point there" in message

    devkit = os.path.join(parent, "stanford_cars", "devkit")
    with pytest.raises(MissingFileError) as error:
        cars.read_index(devkit)
    assert "looks like the devkit/ folder" in _message(error, devkit)


def test_nested_image_folder_of_the_kaggle_copy(tmp_path):
    root = write_cars(str(tmp_path / "cars"))
    os.makedirs(os.path.join(root, "cars_test", "cars_test"))
    with pytest.raises(DataError) as error:
        cars.read_index(root)
    message = _message(error, root)
    assert "cars_test/ holds another cars_test/" in message and "move its images up" in message


def test_data_set_entry(tmp_path):
    root = write_cars(str(tmp_path / "cars"))
    data_set = cars.DATA_SET
    assert data_set.name == "cars" and data_set.read_index is cars.read_index and data_set.download is None
    assert data_set.expected_layout == cars.EXPECTED_LAYOUT and "config.data.manual_dir" in cars.EXPECTED_LAYOUT
    assert os.path.isfile(os.path.join(root, data_set.marker))
    assert "cars_test_annos_withlabels.mat" in data_set.manual_download
    assert "config.data.manual_dir" in data_set.manual_download and "\n" not in data_set.manual_download
