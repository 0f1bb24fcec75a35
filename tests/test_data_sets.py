"""Every registered data set through the shared builder: tiny folders in each official layout (and as
archives) build, read back with their labels and boxes, train and evaluate from the CLI; builds never go stale;
one build serves every run."""
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, tiny_config
from fgpair_jax.data import builder, crops, sources, synthetic

DATA_SETS = sorted(sources.DATA_SETS)


def _load(name, folder, data_dir, **overrides):
    config = tiny_config(**{"data.name": name, "data.manual_dir": str(folder), "data.data_dir": str(data_dir),
                            **overrides})
    return sources.load_sources(config)


def _by_name(source):
    return {element["file_name"].decode(): element for element in (source[i] for i in range(len(source)))}


@pytest.mark.parametrize("name", DATA_SETS)
def test_each_layout_builds_with_its_labels_names_and_boxes(name, tmp_path):
    folder = synthetic.write_tiny(name, str(tmp_path / name))
    index = sources.DATA_SETS[name].read_index(folder, tiny_config(**{"data.name": name}).data)
    data, info = _load(name, folder, tmp_path / "tfds")
    assert info.data_set == name and info.num_classes == len(index.class_names) == 3
    assert info.class_names == index.class_names
    assert info.split_sizes == {split: sum(r.split == split for r in index.records) for split in ("train", "test")}
    by_name = {**_by_name(data["train"]), **_by_name(data["test"])}
    for record in index.records:
        element = by_name[record.file_name]
        assert int(element["label"]) == record.label and int(element["image_id"]) == record.image_id
        height, width = element["image"].shape[:2]
        expected = record.box if record.box is not None else (0, 0, width, height)
        np.testing.assert_allclose(element["box"], expected)
    assert info.has_boxes == (name in ("cars", "aircraft"))


def test_cars_and_aircraft_names_are_kept_verbatim(tmp_path):
    _, cars = _load("cars", synthetic.write_tiny_cars(str(tmp_path / "cars")), tmp_path / "tfds")
    _, aircraft = _load("aircraft", synthetic.write_tiny_aircraft(str(tmp_path / "aircraft")), tmp_path / "tfds")
    assert "Ram C/V Cargo Van Minivan 2012" in cars.class_names and "F/A-18" in aircraft.class_names


def test_aircraft_trains_on_trainval_by_default_and_on_train_when_asked(tmp_path):
    folder = synthetic.write_tiny_aircraft(str(tmp_path / "aircraft"), per_split=2)
    _, trainval = _load("aircraft", folder, tmp_path / "tfds")
    _, train = _load("aircraft", folder, tmp_path / "tfds", **{"data.aircraft_train_split": "train"})
    assert trainval.split_sizes == {"train": 12, "test": 6} and train.split_sizes == {"train": 6, "test": 6}
    assert trainval.builder_dir != train.builder_dir


def test_cub_bounding_boxes_are_read_when_present_and_crop_to_box_cuts_to_them(tmp_path):
    folder = synthetic.write_tiny_cub(str(tmp_path / "CUB_200_2011"), boxes=True)
    full, info = _load("cub", folder, tmp_path / "tfds")
    cropped, _ = _load("cub", folder, tmp_path / "tfds", **{"data.crop_to_box": True})
    assert info.has_boxes
    whole, cut = full["train"][0], cropped["train"][0]
    height, width = whole["image"].shape[:2]
    np.testing.assert_allclose(whole["box"], [4, 4, width - 4, height - 4])
    np.testing.assert_array_equal(cut["image"], whole["image"][4:height - 4, 4:width - 4])
    np.testing.assert_allclose(cut["box"], [0, 0, width - 8, height - 8])


def test_crop_to_box_without_boxes_is_one_line_naming_the_key(tmp_path):
    folder = synthetic.write_tiny_cub(str(tmp_path / "CUB_200_2011"))
    with pytest.raises(ValueError) as excinfo:
        _load("cub", folder, tmp_path / "tfds", **{"data.crop_to_box": True})
    message = str(excinfo.value)
    assert "\n" not in message and "config.data.crop_to_box" in message and "no bounding boxes" in message


def test_the_aircraft_banner_is_kept_by_default_and_removed_when_asked(tmp_path):
    folder = synthetic.write_tiny_aircraft(str(tmp_path / "aircraft"))
    kept, _ = _load("aircraft", folder, tmp_path / "tfds")
    removed, _ = _load("aircraft", folder, tmp_path / "tfds", **{"data.aircraft_remove_banner": True})
    with_banner, without = kept["train"][0], removed["train"][0]
    assert with_banner["image"].shape[0] == without["image"].shape[0] + 20
    assert with_banner["image"][-20:].min() > 200  # the writer's white banner (JPEG noise aside)
    np.testing.assert_array_equal(without["image"], with_banner["image"][:-20])
    assert without["box"][3] <= without["image"].shape[0]


def test_crops_clip_boxes_and_keep_at_least_one_pixel():
    record = {"image": np.zeros((10, 8, 3), np.uint8), "box": np.array([2.5, -3, 2.6, 40], np.float32)}
    cut = crops.to_box(dict(record))
    assert cut["image"].shape == (10, 1, 3)
    short = crops.without_bottom_rows(20)(dict(record))
    assert short["image"].shape[0] == 1 and short["box"][3] == 1


def test_the_banner_knob_on_another_data_set_is_refused_before_any_build(tmp_path):
    from fgpair_jax import run_config
    config = tiny_config(**{"data.aircraft_remove_banner": True, "data.data_dir": str(tmp_path / "tfds")})
    with pytest.raises(ValueError, match="aircraft_remove_banner=True is for FGVC-Aircraft"):
        run_config.validate(config)


@pytest.mark.parametrize("name", DATA_SETS)
def test_each_data_set_reads_its_official_archive(name, tmp_path):
    folder = synthetic.write_tiny(name, str(tmp_path / "unpacked" / "top"))
    archive = tmp_path / f"{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=os.path.basename(folder))
    _, from_archive = _load(name, archive, tmp_path / "tfds")
    _, from_folder = _load(name, folder, tmp_path / "tfds2")
    assert from_archive.split_sizes == from_folder.split_sizes and from_archive.class_names == from_folder.class_names


def test_the_cars_tarballs_and_the_loose_test_annotations_are_read_from_one_folder(tmp_path):
    folder = synthetic.write_tiny_cars(str(tmp_path / "cars"))
    download = tmp_path / "download"
    download.mkdir()
    for archive, member in (("cars_train.tgz", "cars_train"), ("cars_test.tgz", "cars_test"),
                            ("car_devkit.tgz", "devkit")):
        with tarfile.open(download / archive, "w:gz") as tar:
            tar.add(os.path.join(folder, member), arcname=member)
    shutil.copy(os.path.join(folder, "cars_test_annos_withlabels.mat"), download)
    _, info = _load("cars", download, tmp_path / "tfds")
    assert info.split_sizes == {"train": 18, "test": 9}


# ---------------------------------------------------------------- builds never go stale


def test_an_image_replaced_in_place_is_a_new_build_with_the_new_pixels(tmp_path):
    folder = synthetic.write_tiny_image_folder(str(tmp_path / "images"))
    first, first_info = _load("image_folder", folder, tmp_path / "tfds")
    name = "train/class 00/0000.jpg"
    Image.fromarray(np.full((30, 30, 3), 7, np.uint8)).save(os.path.join(folder, name))
    second, second_info = _load("image_folder", folder, tmp_path / "tfds")
    assert second_info.builder_dir != first_info.builder_dir and second_info.built_now
    assert _by_name(second["train"])[name]["image"].shape == (30, 30, 3)
    assert _by_name(first["train"])[name]["image"].shape != (30, 30, 3)


def test_a_changed_copy_of_a_folder_built_into_the_same_data_dir_does_not_reuse_the_old_images(tmp_path):
    original = synthetic.write_tiny_cub(str(tmp_path / "a" / "CUB_200_2011"))
    _, first = _load("cub", original, tmp_path / "tfds")
    copy = shutil.copytree(original, tmp_path / "b" / "CUB_200_2011", copy_function=shutil.copy2)
    _, same = _load("cub", copy, tmp_path / "tfds")  # times kept (cp -p): the same files, the same build
    assert same.builder_dir == first.builder_dir and not same.built_now
    image = next((copy / "images").rglob("*.jpg"))
    stat = image.stat()
    Image.fromarray(np.zeros((44, 48, 3), np.uint8)).save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old modification time
    _, changed = _load("cub", copy, tmp_path / "tfds")
    assert changed.builder_dir != first.builder_dir and changed.built_now


def test_one_shared_build_serves_every_run_and_tfds_data_dir_is_honoured(tmp_path, monkeypatch):
    folder = synthetic.write_tiny_cub(str(tmp_path / "CUB_200_2011"))
    config = tiny_config(**{"data.manual_dir": folder})
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "shared"))
    assert sources.resolve_data_dir(config, str(tmp_path / "run_a")) == str(tmp_path / "shared")
    _, a = sources.load_sources(config, str(tmp_path / "run_a"))
    _, b = sources.load_sources(config, str(tmp_path / "run_b"))
    assert a.builder_dir == b.builder_dir and a.builder_dir.startswith(str(tmp_path / "shared"))
    assert a.built_now and not b.built_now
    assert sources.build_line(b).startswith("Data: cub (3 classes, 18 train / 9 eval images), build ")
    assert sources.build_line(b).endswith("(reused)")
    monkeypatch.delenv("TFDS_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sources.resolve_data_dir(config) == str(tmp_path / "home" / "tensorflow_datasets")


# ---------------------------------------------------------------- the CLI on each data set


@pytest.mark.parametrize("name", ["cars"])
def test_a_data_set_other_than_cub_trains_and_evaluates_from_the_cli(name, tmp_path):
    """One data set end to end (Cars: the devkit .mat and its own config file): after `load_sources` the
    run does not depend on the data set, and every reader's build (labels, names, boxes, splits) is
    checked above without training, so training each of them costs CI minutes and tests nothing more.
    `configs/<name>.py:tiny` of every data set is validated in test_run.py."""
    folder = synthetic.write_tiny(name, str(tmp_path / name))
    result = subprocess.run(
        [sys.executable, "-m", "fgpair_jax.main", f"--config=configs/{name}.py:tiny", f"--workdir={tmp_path / 'run'}",
         f"--config.data.manual_dir={folder}", "--config.method=moco", "--config.eval.figures=false"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Data: {name} (3 classes" in result.stderr + result.stdout
    metrics = json.load(open(tmp_path / "run" / "eval" / "metrics.json"))
    assert metrics["linear_top1"] is not None and metrics["retrieval_rank1"] is not None


@pytest.mark.parametrize("name", DATA_SETS)
def test_a_missing_folder_names_the_layout_and_how_to_get_the_data(name, tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        _load(name, tmp_path / "nowhere", tmp_path / "tfds")
    message = str(excinfo.value)
    assert "\n" not in message and "config.data.manual_dir" in message and "does not exist" in message
    if sources.DATA_SETS[name].download:
        assert "config.data.download=True" in message
    assert not (tmp_path / "tfds").exists()


def test_crop_to_box_on_a_folder_without_boxes_is_refused_before_anything_is_built(tmp_path):
    folder = synthetic.write_tiny_image_folder(str(tmp_path / "images"))
    with pytest.raises(ValueError, match="crop_to_box=True"):
        _load("image_folder", folder, tmp_path / "tfds", **{"data.crop_to_box": True})
    assert not (tmp_path / "tfds" / "fgpair_folder").exists() or not any(
        name[0].isdigit() for _, folders, _ in os.walk(tmp_path / "tfds") for name in folders)


def test_a_folder_of_downloads_extracts_only_the_data_sets_own_archives(tmp_path):
    folder = synthetic.write_tiny_aircraft(str(tmp_path / "unpacked" / "fgvc-aircraft-2013b"))
    downloads = tmp_path / "Downloads"
    downloads.mkdir()
    with tarfile.open(downloads / "fgvc-aircraft-2013b.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="fgvc-aircraft-2013b")
    with tarfile.open(downloads / "holiday_photos.tar", "w") as tar:
        tar.add(folder, arcname="unrelated")
    (downloads / "notes.txt").write_text("not the data set")
    _, info = _load("aircraft", downloads, tmp_path / "tfds")
    assert info.split_sizes == {"train": 18, "test": 9}
    extracted = [name for top, folders, _ in os.walk(tmp_path / "tfds" / "extracted") for name in folders]
    assert "unrelated" not in extracted and "fgvc-aircraft-2013b" in extracted
