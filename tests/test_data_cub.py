"""Tests for the CUB folder builder: label mapping, splits, image hygiene, reuse, and layout errors."""

import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fgpair_jax.data import builder, cub, images

CLASSES = {2: "002.Alpha_bird", 5: "005.Beta_bird", 9: "009.Gamma_bird"}  # Non-contiguous official ids.
SUBSET_DIR = "/work/shared/data/CUB_200_2011_subset100"


def _smooth_rgb(height, width, seed):
    """A gradient image: JPEG round trips keep it close, so conversions can be checked numerically."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y + 40 * seed) % 256], axis=-1)
    return base.astype(np.uint8)


def _write_index(root, name, rows):
    with open(os.path.join(root, name), "w") as handle:
        handle.writelines(f"{a} {b}\n" for a, b in rows)


def make_cub_folder(root):
    """12 images (4 per class, 2 train + 2 test), varied sizes; returns {file_name: special kind}."""
    specials = {"002.Alpha_bird/img_1.jpg": "grey", "005.Beta_bird/img_0.jpg": "cmyk",
                "005.Beta_bird/img_3.jpg": "rgba_png", "009.Gamma_bird/img_2.jpg": "truncated"}
    images, labels, split = [], [], []
    image_id = 1
    for class_id, class_name in CLASSES.items():
        os.makedirs(os.path.join(root, "images", class_name))
        for k in range(4):
            file_name = f"{class_name}/img_{k}.jpg"
            rgb = _smooth_rgb(24 + 7 * image_id, 40 + 3 * image_id, image_id)
            path = os.path.join(root, "images", file_name)
            kind = specials.get(file_name)
            if kind == "grey":
                Image.fromarray(rgb[..., 0]).save(path, format="JPEG")
            elif kind == "cmyk":
                Image.fromarray(rgb).convert("CMYK").save(path, format="JPEG")
            elif kind == "rgba_png":
                Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(path, format="PNG")
            else:
                Image.fromarray(rgb).save(path, format="JPEG", quality=95)
            if kind == "truncated":
                data = open(path, "rb").read()
                open(path, "wb").write(data[: len(data) // 2])
            images.append((image_id, file_name))
            labels.append((image_id, class_id))
            split.append((image_id, int(k < 2)))
            image_id += 1
    _write_index(root, "images.txt", images)
    _write_index(root, "image_class_labels.txt", labels)
    _write_index(root, "train_test_split.txt", split)
    _write_index(root, "classes.txt", [(1, "001.Unused_bird"), *CLASSES.items()])
    return specials


@pytest.fixture()
def cub_folder(tmp_path):
    root = str(tmp_path / "CUB_200_2011")
    specials = make_cub_folder(root)
    return root, specials


def _by_file_name(source):
    return {element["file_name"].decode(): element for element in (source[i] for i in range(len(source)))}


def test_labels_are_contiguous_and_original_ids_kept(cub_folder, tmp_path):
    root, _ = cub_folder
    sources, info = builder.load_sources(cub.DATA_SET, root, str(tmp_path / "tfds"))
    assert info.num_classes == 3
    assert info.class_ids == (2, 5, 9)
    assert info.class_names == tuple(CLASSES.values())
    for source in sources.values():
        for element in _by_file_name(source).values():
            assert info.class_ids[element["label"]] == element["class_id"]
            class_folder = element["file_name"].decode().split("/")[0]
            assert CLASSES[element["class_id"]] == class_folder


def test_split_sizes_follow_train_test_split_minus_skipped(cub_folder, tmp_path):
    root, _ = cub_folder
    sources, info = builder.load_sources(cub.DATA_SET, root, str(tmp_path / "tfds"))
    assert info.split_sizes == {"train": 6, "test": 5}  # The truncated image is a test image.
    assert {split: len(source) for split, source in sources.items()} == info.split_sizes
    train_names = set(_by_file_name(sources["train"]))
    assert all(name.endswith(("img_0.jpg", "img_1.jpg")) for name in train_names)


def test_problem_images_become_rgb_and_undecodable_ones_are_skipped(cub_folder, tmp_path, caplog):
    root, specials = cub_folder
    with caplog.at_level(logging.WARNING, logger=builder.__name__):
        sources, info = builder.load_sources(cub.DATA_SET, root, str(tmp_path / "tfds"))
    elements = {**_by_file_name(sources["train"]), **_by_file_name(sources["test"])}
    for element in elements.values():
        assert element["image"].dtype == np.uint8 and element["image"].ndim == 3
        assert element["image"].shape[-1] == 3
    grey = elements["002.Alpha_bird/img_1.jpg"]["image"].astype(int)
    assert np.abs(grey[..., 0] - grey[..., 2]).max() <= 2
    rgba = elements["005.Beta_bird/img_3.jpg"]["image"].astype(int)
    assert np.abs(rgba - _smooth_rgb(rgba.shape[0], rgba.shape[1], 8)).mean() < 3
    cmyk = elements["005.Beta_bird/img_0.jpg"]["image"].astype(int)
    assert np.abs(cmyk - _smooth_rgb(cmyk.shape[0], cmyk.shape[1], 5)).mean() < 3
    assert "009.Gamma_bird/img_2.jpg" not in elements
    assert info.skipped_files == {"train": (), "test": ("009.Gamma_bird/img_2.jpg",)}
    warnings = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert warnings == ["CUB folder test split: skipped 1 undecodable images: 009.Gamma_bird/img_2.jpg"]


def test_a_build_says_one_line_of_its_own_and_no_tfds_warning(cub_folder, tmp_path, capsys, caplog):
    """Issue 26: TFDS's 'Downloading and preparing dataset Unknown size' (for a local folder) and its 'custom
    data configuration' warning, on every run and in every grain worker, are gone; our line says what is built."""
    root, _ = cub_folder
    data_dir = str(tmp_path / "tfds")
    with caplog.at_level(logging.INFO):
        sources, info = builder.load_sources(cub.DATA_SET, root, data_dir)
        builder.load_sources(cub.DATA_SET, root, data_dir)  # reused: says nothing
        pickle.loads(pickle.dumps(sources["train"]))  # what a grain worker does: the builder is made again
    out = capsys.readouterr().out
    assert out == f"Building CUB folder (12 images listed) into {info.builder_dir}; later runs reuse it.\n"
    logged = [record.getMessage() for record in caplog.records]
    assert not [m for m in logged if "custom data configuration" in m or "Downloading" in m], logged


def test_valid_rgb_jpeg_is_stored_byte_for_byte(cub_folder):
    root, _ = cub_folder
    path = os.path.join(root, "images", "002.Alpha_bird/img_0.jpg")
    assert images.as_rgb_jpeg_bytes(path) == open(path, "rb").read()
    converted = images.as_rgb_jpeg_bytes(os.path.join(root, "images", "005.Beta_bird/img_3.jpg"))
    assert Image.open(io.BytesIO(converted)).format == "JPEG"


def test_second_load_reuses_the_build(cub_folder, tmp_path, monkeypatch):
    root, _ = cub_folder
    data_dir = str(tmp_path / "tfds")
    _, first = builder.load_sources(cub.DATA_SET, root, data_dir)
    stamps = {name: os.stat(os.path.join(first.builder_dir, name)).st_mtime_ns for name in os.listdir(first.builder_dir)}

    def fail_if_rebuilt(*args, **kwargs):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(builder.FolderBuild, "_split_generators", fail_if_rebuilt)
    sources, second = builder.load_sources(cub.DATA_SET, root, data_dir)
    assert second == first
    assert {n: os.stat(os.path.join(first.builder_dir, n)).st_mtime_ns for n in stamps} == stamps
    assert len(sources["train"]) == 6


def test_different_folders_get_different_builds(cub_folder, tmp_path):
    root, _ = cub_folder
    smaller = str(tmp_path / "smaller")
    shutil.copytree(root, smaller)
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt"):
        lines = open(os.path.join(smaller, name)).readlines()
        open(os.path.join(smaller, name), "w").writelines(lines[:8])  # Drops class 9.
    data_dir = str(tmp_path / "tfds")
    _, full = builder.load_sources(cub.DATA_SET, root, data_dir)
    _, part = builder.load_sources(cub.DATA_SET, smaller, data_dir)
    assert (full.num_classes, part.num_classes) == (3, 2)
    assert full.builder_dir != part.builder_dir
    assert part.split_sizes == {"train": 4, "test": 4}


def test_missing_folder_names_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*config\.data\.manual_dir"):
        builder.load_sources(cub.DATA_SET, str(tmp_path / "nowhere"), str(tmp_path / "tfds"))


@pytest.mark.parametrize("missing", ["images.txt", "image_class_labels.txt", "train_test_split.txt", "images"])
def test_missing_layout_part_names_it_and_the_config_key(cub_folder, tmp_path, missing):
    root, _ = cub_folder
    path = os.path.join(root, missing)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    with pytest.raises(FileNotFoundError, match=rf"lacks {missing}.*config\.data\.manual_dir"):
        builder.load_sources(cub.DATA_SET, root, str(tmp_path / "tfds"))


def test_inconsistent_image_ids_are_a_layout_error(cub_folder, tmp_path):
    root, _ = cub_folder
    lines = open(os.path.join(root, "train_test_split.txt")).readlines()
    open(os.path.join(root, "train_test_split.txt"), "w").writelines(lines[1:])
    with pytest.raises(ValueError, match=r"train_test_split\.txt differ from images\.txt.*config\.data\.manual_dir"):
        builder.load_sources(cub.DATA_SET, root, str(tmp_path / "tfds"))


def test_class_missing_from_classes_txt_is_a_layout_error(cub_folder, tmp_path):
    root, _ = cub_folder
    _write_index(root, "classes.txt", [(2, CLASSES[2]), (5, CLASSES[5])])
    with pytest.raises(ValueError, match=r"class ids \[9\].*classes\.txt"):
        builder.load_sources(cub.DATA_SET, root, str(tmp_path / "tfds"))


def test_empty_split_is_an_error(cub_folder, tmp_path):
    root, _ = cub_folder
    _write_index(root, "train_test_split.txt", [(i, 1) for i in range(1, 13)])
    with pytest.raises(ValueError, match="leaves the test split empty"):
        builder.load_sources(cub.DATA_SET, root, str(tmp_path / "tfds"))


@pytest.fixture(scope="module")
def subset_build(tmp_path_factory):
    if not os.path.isdir(SUBSET_DIR):
        pytest.skip(f"shared CUB subset absent at {SUBSET_DIR}")
    return builder.load_sources(cub.DATA_SET, SUBSET_DIR, str(tmp_path_factory.mktemp("tfds")))


def test_shared_subset_builds_with_official_split(subset_build):
    sources, info = subset_build
    assert info.num_classes == 100
    assert info.split_sizes == {"train": 2999, "test": 2903}
    assert info.skipped_files == {"train": (), "test": ()}
    element = sources["test"][0]
    assert element["image"].shape == (227, 227, 3) and element["image"].dtype == np.uint8
    assert 0 <= element["label"] < 100 and info.class_ids[element["label"]] == element["class_id"]


BUILD_AT_ONCE = """
import json, os, sys, time
from fgpair_jax.data import builder, cub, images

generate = builder.FolderBuild._generate_examples
def slow_generate(self, *args):  # a build that takes a while: the other process tries meanwhile
    time.sleep(1.0)
    yield from generate(self, *args)
builder.FolderBuild._generate_examples = slow_generate

root, data_dir, ready, index = sys.argv[1:]
open(f"{ready}.{index}", "w").close()
while not all(os.path.exists(f"{ready}.{i}") for i in "01"):  # start both loads together
    time.sleep(0.01)
sources, info = builder.load_sources(cub.DATA_SET, root, data_dir)
print(json.dumps({"sizes": info.split_sizes, "dir": info.builder_dir, "first": int(sources["train"][0]["image_id"])}))
"""


def test_two_processes_building_the_same_folder_at_once_build_it_once(cub_folder, tmp_path):
    """The issue's reproduction: two first runs sharing a data_dir used to end the slower one with
    'FileExistsError: Cannot rename ... incomplete...'. Now one builds, the other waits and reuses it."""
    root, _ = cub_folder
    data_dir = str(tmp_path / "tfds")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    processes = [subprocess.Popen([sys.executable, "-c", BUILD_AT_ONCE, root, data_dir, str(tmp_path / "ready"), str(i)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for i in range(2)]
    try:
        outputs = [process.communicate(timeout=300) for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert [process.returncode for process in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results[0] == results[1] and results[0]["sizes"] == {"train": 6, "test": 5}
    assert sum("Waiting for another process to finish building" in err for _, err in outputs) == 1
    builds = os.path.join(data_dir, builder.FolderBuild.name)
    assert sorted(os.listdir(builds)) == sorted([os.path.basename(os.path.dirname(results[0]["dir"])),
                                                 os.path.basename(os.path.dirname(results[0]["dir"])) + ".lock"])
    assert os.listdir(os.path.dirname(results[0]["dir"])) == [os.path.basename(results[0]["dir"])]  # no incomplete.*


@pytest.mark.parametrize("already_built", [False, True])
def test_an_interrupted_builds_incomplete_folder_is_removed_by_the_next_build(cub_folder, tmp_path, caplog,
                                                                              already_built):
    """`kill -9` during a build leaves TFDS's temporary folder (incomplete.<random>_<version>) forever. The
    next load holds the build lock, so no other process is building: it removes the folder, in one line."""
    root, _ = cub_folder
    data_dir = str(tmp_path / "tfds")
    config_dir = os.path.join(data_dir, builder.FolderBuild.name, builder.build_config(cub.DATA_SET, root).name)
    if already_built:
        builder.load_sources(cub.DATA_SET, root, data_dir)
    stale = [os.path.join(config_dir, f"incomplete.{suffix}_{version}")
             for suffix, version in (("Q7K2ZP", "2.0.0"), ("AB12CD", "1.1.0"))]
    for folder in stale:
        os.makedirs(folder)
        open(os.path.join(folder, "cub_folder-train.array_record-00000-of-00001"), "wb").write(b"\0" * 100)
    other_config = os.path.join(data_dir, builder.FolderBuild.name, "cub_classes7_0000000000", "incomplete.ZZZZZZ_2.0.0")
    os.makedirs(other_config)  # another folder's build: its own lock covers it, not this one's
    with caplog.at_level(logging.WARNING, logger=builder.__name__):
        _, info = builder.load_sources(cub.DATA_SET, root, data_dir)
    assert info.split_sizes == {"train": 6, "test": 5}
    assert sorted(os.listdir(config_dir)) == ["2.0.0"]
    assert os.path.isdir(other_config)
    messages = [m for m in caplog.messages if "incomplete." in m]
    assert len(messages) == 1 and "\n" not in messages[0], caplog.messages
    assert "Removed 2 unfinished build folders left by an interrupted build" in messages[0]
    assert all(os.path.basename(folder) in messages[0] for folder in stale)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=builder.__name__):
        builder.load_sources(cub.DATA_SET, root, data_dir)
    assert not [m for m in caplog.messages if "incomplete." in m]


def test_each_image_folder_is_listed_once_per_build(tmp_path, monkeypatch):
    """A name that is not the exact spelling on disk (another Unicode normal form, '.JPG' for '.jpg') used to
    list and normalise its whole folder again: quadratic (8,000 such names in one folder took over a minute).
    Now each folder is listed once per build, and names still match across normal forms."""
    import unicodedata

    from fgpair_jax.data.synthetic import write_tiny_cub

    root = write_tiny_cub(str(tmp_path / "CUB_200_2011"), train_per_class=2, test_per_class=1)
    images_dir = os.path.join(root, "images")
    folder = "002.Bird_2"
    lines = {name: open(os.path.join(root, name)).read().splitlines()
             for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt")}
    for k in range(3):  # the real images of class 2: NFD on disk, NFC in images.txt (a folder from macOS)
        listed = f"{folder}/Caf\u00e9_{k}.jpg"
        os.rename(os.path.join(images_dir, folder, f"Bird_2_{k:04d}.jpg"),
                  os.path.join(images_dir, unicodedata.normalize("NFD", listed)))
        lines["images.txt"][k] = f"{k + 1} {listed}"
    for k in range(200):  # '.JPG' on disk, '.jpg' in images.txt: missing, but each one is looked up
        image_id = 100 + k
        open(os.path.join(images_dir, folder, f"Extra_{k:03d}.JPG"), "wb").close()
        lines["images.txt"].append(f"{image_id} {folder}/Extra_{k:03d}.jpg")
        lines["image_class_labels.txt"].append(f"{image_id} 2")
        lines["train_test_split.txt"].append(f"{image_id} {k % 2}")
    for name, rows in lines.items():
        open(os.path.join(root, name), "w").write("\n".join(rows) + "\n")

    listed = []
    real_listdir, real_scandir = os.listdir, os.scandir

    def counting(real):
        def listing(path="."):
            if os.fspath(path).startswith(images_dir):
                listed.append(os.path.relpath(os.fspath(path), images_dir))
            return real(path)
        return listing

    monkeypatch.setattr(os, "listdir", counting(real_listdir))
    monkeypatch.setattr(os, "scandir", counting(real_scandir))
    sources, info = builder.load_sources(cub.DATA_SET, root, str(tmp_path / "tfds"))
    assert sorted(listed) == sorted(set(listed)) and folder in listed, listed
    assert info.split_sizes == {"train": 6, "test": 3}
    assert len(info.skipped_by_reason["train"]["missing"]) == len(info.skipped_by_reason["test"]["missing"]) == 100
    stored = {int(sources["train"][i]["image_id"]): sources["train"][i]["file_name"].decode() for i in range(6)}
    assert stored[1] == f"{folder}/Caf\u00e9_0.jpg"
