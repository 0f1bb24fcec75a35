"""Tests for the FGVC-Aircraft 2013b reader (`fgpair_jax.data.aircraft`): a tiny fgvc-aircraft-2013b/ folder in
the official layout (data/images, variants.txt, images_variant_<split>.txt, images_box.txt)."""

import os

import ml_collections
import pytest
from PIL import Image

from fgpair_jax.data import aircraft
from fgpair_jax.errors import ConfigError, DataError, MissingFileError

VARIANTS = ("707-320", "F/A-18", "Boeing 737-700", "Cessna 172")
# image id -> variant, per official split; val is the part of trainval that "train" leaves out.
SPLITS = {
    "train": [("0034309", "F/A-18"), ("1025794", "707-320"), ("0056978", "Cessna 172")],
    "val": [("0787226", "Boeing 737-700"), ("0000001", "F/A-18")],
    "test": [("2074164", "Boeing 737-700"), ("0111111", "707-320")],
}
# 1-based inclusive corners, as images_box.txt gives them (one per image of every split).
BOXES = {"0034309": (1, 1, 16, 12), "1025794": (3, 2, 10, 9), "0056978": (5, 5, 5, 5), "0787226": (2, 3, 4, 5),
         "0000001": (1, 2, 3, 4), "2074164": (4, 1, 16, 7), "0111111": (1, 1, 2, 2)}


def _write(root, name, lines, newline="\n", bom=False):
    with open(os.path.join(root, name), "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as handle:
        handle.write("".join(line + newline for line in lines))


def write_aircraft(root, variants=VARIANTS, splits=SPLITS, boxes=BOXES):
    """The extracted archive's layout under `root` (= fgvc-aircraft-2013b/); `boxes=None` leaves out images_box.txt."""
    os.makedirs(os.path.join(root, aircraft.IMAGES))
    splits = dict(splits, trainval=splits["train"] + splits["val"])
    for image, _ in splits["trainval"] + splits["test"]:
        # 20 more rows than the content: the copyright banner the builder crops.
        Image.new("RGB", (16, 12 + aircraft.BANNER_ROWS), (200, 200, 210)).save(
            os.path.join(root, aircraft.IMAGES, f"{image}.jpg"), format="JPEG")
    _write(root, aircraft.VARIANTS, variants)
    for split, rows in splits.items():
        _write(root, aircraft.split_file(split), [f"{image} {variant}" for image, variant in rows])
        _write(root, f"data/images_{split}.txt", [image for image, _ in rows])
    if boxes is not None:
        _write(root, aircraft.BOXES, [f"{image} {' '.join(map(str, box))}" for image, box in boxes.items()])
    return root


def _message(error_info, root) -> str:
    message = str(error_info.value)
    assert "\n" not in message, message
    assert repr(root) in message, message
    return message


def test_reads_trainval_and_test_by_default(tmp_path):
    root = write_aircraft(str(tmp_path / "fgvc-aircraft-2013b"))
    index = aircraft.read_index(root)
    assert index.class_names == VARIANTS  # verbatim, in variants.txt order ("F/A-18" kept whole)
    assert index.class_ids == (1, 2, 3, 4)
    assert index.images_dir == os.path.join(root, "data", "images") and index.manual_dir == root
    assert index.data_set == "FGVC-Aircraft folder" and index.expected_layout == aircraft.EXPECTED_LAYOUT
    assert index.listed_in == "data/images_variant_trainval.txt and data/images_variant_test.txt"
    ids = [record.image_id for record in index.records]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) == 7
    by_id = {record.image_id: record for record in index.records}
    assert sorted(i for i, r in by_id.items() if r.split == "train") == [1, 34309, 56978, 787226, 1025794]
    assert sorted(i for i, r in by_id.items() if r.split == "test") == [111111, 2074164]
    assert by_id[34309].file_name == "0034309.jpg" and by_id[1].file_name == "0000001.jpg"
    assert index.class_names[by_id[34309].label] == "F/A-18" and by_id[34309].label == 1
    assert index.class_names[by_id[2074164].label] == "Boeing 737-700"
    # 1-based inclusive corners -> 0-based edges.
    assert by_id[34309].box == (0.0, 0.0, 16.0, 12.0)
    assert by_id[56978].box == (4.0, 4.0, 5.0, 5.0)
    assert by_id[2074164].box == (3.0, 0.0, 16.0, 7.0)
    assert all(isinstance(v, float) for r in index.records for v in r.box)
    assert all(os.path.isfile(os.path.join(index.images_dir, r.file_name)) for r in index.records)
    assert aircraft.BANNER_ROWS == 20


@pytest.mark.parametrize("data_config, expected", [
    (None, "trainval"),
    (ml_collections.ConfigDict({"name": "aircraft"}), "trainval"),
    (ml_collections.ConfigDict({"aircraft_train_split": "trainval"}), "trainval"),
    (ml_collections.ConfigDict({"aircraft_train_split": "train"}), "train"),
])
def test_train_split_knob(tmp_path, data_config, expected):
    root = write_aircraft(str(tmp_path / "fgvc-aircraft-2013b"))
    index = aircraft.read_index(root, data_config)
    train = sorted(r.file_name for r in index.records if r.split == "train")
    wanted = SPLITS["train"] + (SPLITS["val"] if expected == "trainval" else [])
    assert train == sorted(f"{image}.jpg" for image, _ in wanted)
    assert len([r for r in index.records if r.split == "test"]) == 2
    assert index.listed_in == f"data/images_variant_{expected}.txt and data/images_variant_test.txt"


@pytest.mark.parametrize("value", ["val", "test", "TRAIN", ""])
def test_bad_train_split_is_a_config_error(tmp_path, value):
    root = write_aircraft(str(tmp_path / "fgvc-aircraft-2013b"))
    with pytest.raises(ConfigError) as error:
        aircraft.read_index(root, ml_collections.ConfigDict({"aircraft_train_split": value}))
    message = str(error.value)
    assert "config.data.aircraft_train_split" in message and repr(value) in message
    assert "'trainval'" in message and "'train'" in message and "\n" not in message


def test_without_box_file_boxes_are_none(tmp_path):
    root = write_aircraft(str(tmp_path / "fgvc-aircraft-2013b"), boxes=None)
    index = aircraft.read_index(root)
    assert len(index.records) == 7 and all(r.box is None for r in index.records) and not index.has_boxes


def test_windows_line_ends_and_byte_order_mark(tmp_path):
    root = write_aircraft(str(tmp_path / "fgvc-aircraft-2013b"))
    _write(root, aircraft.VARIANTS, VARIANTS, newline="\r\n", bom=True)
    _write(root, aircraft.split_file("test"), [f"{i} {v}" for i, v in SPLITS["test"]], newline="\r\n", bom=True)
    index = aircraft.read_index(root)
    assert index.class_names == VARIANTS
    assert {r.image_id: index.class_names[r.label] for r in index.records if r.split == "test"} == {
        2074164: "Boeing 737-700", 111111: "707-320"}


def _edit(root, name, lines):
    _write(root, name, lines)


@pytest.mark.parametrize("case, words", [
    ("unknown variant", ["data/images_variant_test.txt line 2", "'Boeing 747-400'", "not in data/variants.txt"]),
    ("in train and test", ["image 0034309", "data/images_variant_trainval.txt line 1",
                           "data/images_variant_test.txt line 3"]),
    ("no variant name", ["data/images_variant_test.txt line 1", "<7-digit image id> <variant name>"]),
    ("short image id", ["data/images_variant_test.txt line 2", "<7-digit image id> <variant name>"]),
    ("repeated image", ["data/images_variant_test.txt line 3", "repeats image 2074164 of line 1"]),
    ("repeated variant", ["data/variants.txt line 5", "repeats variant 'F/A-18' of line 2"]),
    ("malformed box", ["data/images_box.txt line 3", "xmin ymin xmax ymax"]),
    ("box missing", ["data/images_box.txt has no box for image 0111111", "data/images_variant_test.txt line 2"]),
    ("reversed box", ["data/images_box.txt line 1", "reversed box", "0034309"]),
    ("not utf-8", ["data/variants.txt is not UTF-8 text"]),
    ("empty split", ["data/images_variant_test.txt lists no images"]),
])
def test_bad_index_files_are_one_line_errors(tmp_path, case, words):
    root = write_aircraft(str(tmp_path / "fgvc-aircraft-2013b"))
    test_lines = [f"{i} {v}" for i, v in SPLITS["test"]]
    box_lines = [f"{i} {' '.join(map(str, b))}" for i, b in BOXES.items()]
    if case == "unknown variant":
        _edit(root, aircraft.split_file("test"), [test_lines[0], "0111111 Boeing 747-400"])
    elif case == "in train and test":
        _edit(root, aircraft.split_file("test"), test_lines + ["0034309 F/A-18"])
    elif case == "no variant name":
        _edit(root, aircraft.split_file("test"), ["2074164"] + test_lines[1:])
    elif case == "short image id":
        _edit(root, aircraft.split_file("test"), [test_lines[0], "111111 707-320"])
    elif case == "repeated image":
        _edit(root, aircraft.split_file("test"), test_lines + ["2074164 Cessna 172"])
    elif case == "repeated variant":
        _edit(root, aircraft.VARIANTS, list(VARIANTS) + ["F/A-18"])
    elif case == "malformed box":
        _edit(root, aircraft.BOXES, box_lines[:2] + ["0056978 5 5 five 5"] + box_lines[3:])
    elif case == "box missing":
        _edit(root, aircraft.BOXES, [line for line in box_lines if not line.startswith("0111111")])
    elif case == "reversed box":
        _edit(root, aircraft.BOXES, ["0034309 10 1 3 12"] + box_lines[1:])
    elif case == "not utf-8":
        with open(os.path.join(root, aircraft.VARIANTS), "wb") as handle:
            handle.write("707-320\n".encode("utf-16"))
    elif case == "empty split":
        _edit(root, aircraft.split_file("test"), [])
    with pytest.raises(DataError) as error:
        aircraft.read_index(root)
    message = _message(error, root)
    for word in words:
        assert word in message, (word, message)


def test_folder_problems_are_one_line_errors(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(MissingFileError) as error:
        aircraft.read_index(missing)
    assert "does not exist" in _message(error, missing) and "config.data.manual_dir" in str(error.value)

    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    with pytest.raises(MissingFileError) as error:
        aircraft.read_index(empty)
    assert "is empty" in _message(error, empty)

    parent = str(tmp_path / "downloads")
    root = write_aircraft(os.path.join(parent, "fgvc-aircraft-2013b"))
    with pytest.raises(MissingFileError) as error:
        aircraft.read_index(parent)
    message = _message(error, parent)
    assert "lacks data/variants.txt" in message
    assert "subfolder 'fgvc-aircraft-2013b'" in message and "point there" in message

    data = os.path.join(root, "data")
    with pytest.raises(MissingFileError) as error:
        aircraft.read_index(data)
    assert "looks like the data/ folder" in _message(error, data)


def test_annotations_only_archive_and_missing_split_file(tmp_path):
    root = str(tmp_path / "fgvc-aircraft-2013b")
    write_aircraft(root)
    os.remove(os.path.join(root, aircraft.split_file("train")))
    with pytest.raises(MissingFileError) as error:  # only the chosen train split's file is needed
        aircraft.read_index(root, ml_collections.ConfigDict({"aircraft_train_split": "train"}))
    assert "lacks data/images_variant_train.txt" in _message(error, root)
    assert aircraft.read_index(root) is not None  # trainval still reads

    for name in os.listdir(os.path.join(root, aircraft.IMAGES)):
        os.remove(os.path.join(root, aircraft.IMAGES, name))
    os.rmdir(os.path.join(root, aircraft.IMAGES))
    with pytest.raises(MissingFileError) as error:
        aircraft.read_index(root)
    message = _message(error, root)
    assert "lacks data/images" in message and "annotations-only archive" in message


def test_data_set_entry(tmp_path):
    root = write_aircraft(str(tmp_path / "fgvc-aircraft-2013b"))
    data_set = aircraft.DATA_SET
    assert data_set.name == "aircraft" and data_set.read_index is aircraft.read_index
    assert data_set.expected_layout == aircraft.EXPECTED_LAYOUT and "config.data.manual_dir" in data_set.expected_layout
    assert os.path.isfile(os.path.join(root, data_set.marker))
    download = data_set.download
    assert download.url == "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz"
    assert download.file_name == "fgvc-aircraft-2013b.tar.gz"
    assert download.md5 == "d4acdd33327262359767eeaa97a4f732"
    assert "MD5 Sum" in download.checksum_source
    assert "config.data.manual_dir" in data_set.manual_download and "\n" not in data_set.manual_download
