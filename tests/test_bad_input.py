"""Bad input end to end: folders and index files that are wrong, images that are odd or broken.

Complements test_data_cub.py (missing folder and layout parts, grey/CMYK/PNG conversion, one truncated
image skipped) and test_end_to_end.py (CLI: missing folder, unknown config key, wrong type). Folder
errors must be one line naming the cause and `config.data.manual_dir`; odd images must be converted and
broken ones skipped with a counted warning at build time, so that the train and eval pipelines never
meet an unreadable image mid-run.
"""
import errno
import io
import logging
import os
import shutil
import types
import unicodedata

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import tiny_config, write_tiny_cub
from fgpair_jax.data import builder, cub, images, pipeline
from fgpair_jax.errors import UserError


def _one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def _jpeg_bytes(pixels, **save_kwargs):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", **save_kwargs)
    return buffer.getvalue()


def _noise(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------- the folder and its index files


def test_empty_folder_says_empty_and_names_the_layout_and_config_key(tmp_path):
    empty = tmp_path / "CUB_200_2011"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as excinfo:
        builder.load_sources(cub.DATA_SET, str(empty), str(tmp_path / "tfds"))
    _one_line_error(excinfo, "is empty", "images.txt", "images/<class>/<file>.jpg", "config.data.manual_dir")


def test_parent_of_the_extracted_folder_points_at_it(tmp_path):
    write_tiny_cub(str(tmp_path / "download" / "CUB_200_2011"), train_per_class=1, test_per_class=1)
    with pytest.raises(FileNotFoundError) as excinfo:
        builder.load_sources(cub.DATA_SET, str(tmp_path / "download"), str(tmp_path / "tfds"))
    _one_line_error(excinfo, "lacks images.txt", "subfolder 'CUB_200_2011'", "config.data.manual_dir")


def test_a_file_given_as_the_folder_says_so(tmp_path):
    archive = tmp_path / "CUB_200_2011.tgz"
    archive.write_bytes(b"\x1f\x8b not extracted")
    with pytest.raises(FileNotFoundError) as excinfo:
        builder.load_sources(cub.DATA_SET, str(archive), str(tmp_path / "tfds"))
    _one_line_error(excinfo, "is a file, not a folder", "config.data.manual_dir")


def _remove_classes_txt(root):
    os.remove(os.path.join(root, "classes.txt"))


def _empty_images_txt(root):
    open(os.path.join(root, "images.txt"), "w").close()


def _garbled_line(root):
    with open(os.path.join(root, "image_class_labels.txt"), "a") as handle:
        handle.write("not-an-id 2\n")


def _utf16_index(root):
    path = os.path.join(root, "classes.txt")
    text = open(path, encoding="utf-8").read()
    open(path, "w", encoding="utf-16").write(text)  # e.g. saved by a Windows editor


@pytest.mark.parametrize(
    "damage, error, cause",
    [
        (_remove_classes_txt, FileNotFoundError, "lacks classes.txt"),
        (_empty_images_txt, ValueError, "images.txt lists no images"),
        (_garbled_line, ValueError, "image_class_labels.txt line 28 is not '<id> <value>'"),
        (_utf16_index, ValueError, "classes.txt is not UTF-8 text"),
    ],
)
def test_bad_index_file_is_one_line_naming_it_and_the_layout(tmp_path, damage, error, cause):
    root = write_tiny_cub(str(tmp_path / "CUB_200_2011"))
    damage(root)
    with pytest.raises(error) as excinfo:
        builder.load_sources(cub.DATA_SET, root, str(tmp_path / "tfds"))
    _one_line_error(excinfo, cause, "config.data.manual_dir")


def _append(root, file_name, line):
    with open(os.path.join(root, file_name), "a") as handle:
        handle.write(line + "\n")


def _replace_line(root, file_name, line_number, line):
    path = os.path.join(root, file_name)
    lines = open(path).read().splitlines()
    lines[line_number - 1] = line
    open(path, "w").write("\n".join(lines) + "\n")


FIRST = "002.Bird_2/Bird_2_0000.jpg"  # image id 1 (train) of the tiny folder; ids 7-9 of class 2 are test


@pytest.mark.parametrize(
    "damage, cause",
    [
        (lambda root: _append(root, "images.txt", f"1 {FIRST}"),
         f"images.txt line 28 repeats image id 1 of line 1 (same value '{FIRST}')"),
        (lambda root: _append(root, "image_class_labels.txt", "3 9"),
         "image_class_labels.txt line 28 repeats image id 3 of line 3 with a conflicting value ('9' after '2')"),
        (lambda root: _append(root, "train_test_split.txt", "3 0"),
         "train_test_split.txt line 28 repeats image id 3 of line 3 with a conflicting value ('0' after '1')"),
        (lambda root: _append(root, "classes.txt", "5 005.Other_bird"),
         "classes.txt line 4 repeats class id 5 of line 2 with a conflicting value ('005.Other_bird' after "),
        (lambda root: _replace_line(root, "images.txt", 7, f"7 {FIRST}"),
         f"images.txt line 7 lists '{FIRST}' as image id 7, but line 1 already lists that file as image id 1 "
         "(one in train, one in test: a test image would be trained on)"),
        (lambda root: _replace_line(root, "images.txt", 2, f"2 ./{FIRST}"),
         f"images.txt line 2 lists './{FIRST}' as image id 2, but line 1 already lists that file as image id 1. "),
    ],
    ids=["repeated_id", "conflicting_label", "train_and_test", "repeated_class", "file_under_two_ids",
         "same_file_spelt_differently"],
)
def test_repeated_or_conflicting_index_lines_are_one_line_naming_file_line_and_id(tmp_path, damage, cause):
    """A later line used to overwrite an earlier one silently: a second label line changed the image's class,
    and one file under two ids, one in train and one in test, leaked a test image into training."""
    root = write_tiny_cub(str(tmp_path / "CUB_200_2011"))
    damage(root)
    with pytest.raises(ValueError) as excinfo:
        builder.load_sources(cub.DATA_SET, root, str(tmp_path / "tfds"))
    _one_line_error(excinfo, cause, "Correct the index file (nothing was built)")
    assert not os.path.exists(tmp_path / "tfds")


def test_no_readable_image_in_a_split_is_one_line_and_the_fixed_folder_then_builds(tmp_path):
    root = write_tiny_cub(str(tmp_path / "CUB_200_2011"), train_per_class=2, test_per_class=1)
    shutil.move(os.path.join(root, "images"), str(tmp_path / "elsewhere"))
    os.mkdir(os.path.join(root, "images"))  # Present but empty: every listed file is missing.
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(ValueError) as excinfo:
        builder.load_sources(cub.DATA_SET, root, data_dir)
    _one_line_error(excinfo, "none of the 6 train images", "could be read from images/", "config.data.manual_dir")

    os.rmdir(os.path.join(root, "images"))
    shutil.move(str(tmp_path / "elsewhere"), os.path.join(root, "images"))
    _, info = builder.load_sources(cub.DATA_SET, root, data_dir)  # The failed build left nothing behind to be reused.
    assert info.split_sizes == {"train": 6, "test": 3}


@pytest.mark.parametrize("listed_form, disk_form", [("NFC", "NFD"), ("NFD", "NFC")])
def test_names_match_files_across_unicode_normal_forms(tmp_path, listed_form, disk_form):
    """A folder prepared or unzipped on macOS stores 'é' as 'e' + U+0301 (NFD) while images.txt has one code
    point (NFC): other bytes on Linux, so the image used to be skipped as 'undecodable'."""
    root = write_tiny_cub(str(tmp_path / "CUB_200_2011"))
    accented = "002.Bird_2/Bird_2_Caf\u00e9_Gr\u00fcnfink_0000.jpg"
    listed, on_disk = (unicodedata.normalize(form, accented) for form in (listed_form, disk_form))
    assert listed != on_disk
    os.rename(os.path.join(root, "images", FIRST), os.path.join(root, "images", on_disk))
    _replace_line(root, "images.txt", 1, f"1 {listed}")
    sources, info = builder.load_sources(cub.DATA_SET, root, str(tmp_path / "tfds"))
    assert info.skipped_files == {"train": (), "test": ()} and info.split_sizes == {"train": 18, "test": 9}
    stored = {sources["train"][i]["image_id"]: sources["train"][i]["file_name"].decode() for i in range(18)}
    assert stored[1] == listed  # the id's name as images.txt spells it


def test_a_photo_above_pillows_pixel_limit_is_too_large_and_kept_when_allowed(tmp_path, monkeypatch, caplog):
    """Pillow refuses more than 2 x MAX_IMAGE_PIXELS pixels (about 179 million) as a decompression bomb; such
    a valid photo used to be reported 'undecodable'. Here MAX_IMAGE_PIXELS = 4000 stands for Pillow's
    default, so a 100 x 100 photo is above the limit while the fixture's (at most 72 x 48) are not."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    monkeypatch.setattr(images, "STORED_MAX_PIXELS", 4000)
    root = write_tiny_cub(str(tmp_path / "CUB_200_2011"))
    open(os.path.join(root, "images", FIRST), "wb").write(_jpeg_bytes(_noise(100, 100), quality=90))
    with caplog.at_level(logging.WARNING, logger=builder.__name__):
        _, info = builder.load_sources(cub.DATA_SET, root, str(tmp_path / "tfds"))
    assert info.skipped_by_reason == {"train": {"too large": (FIRST,)}, "test": {}}
    assert any(f"skipped 1 too large images: {FIRST} (" in m and "config.data.max_image_pixels" in m
               for m in caplog.messages)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=builder.__name__):
        sources, info = builder.load_sources(cub.DATA_SET, root, str(tmp_path / "tfds"), max_image_pixels=10_000)
    assert info.skipped_files == {"train": (), "test": ()} and info.split_sizes["train"] == 18
    first = next(sources["train"][i] for i in range(18) if sources["train"][i]["image_id"] == 1)
    height, width, _ = first["image"].shape  # decoded by Pillow with its (patched) limit, as a reader would
    assert height == width and 3900 <= height * width <= 4000
    assert any("stored 1 images downscaled to 4000 pixels" in m and FIRST in m for m in caplog.messages)


@pytest.mark.parametrize("bad", [0, -5, 1.5, "big", True])
def test_max_image_pixels_must_be_a_positive_integer_or_none(tmp_path, bad):
    root = write_tiny_cub(str(tmp_path / "CUB_200_2011"), train_per_class=1, test_per_class=1)
    with pytest.raises(ValueError) as excinfo:
        builder.load_sources(cub.DATA_SET, root, str(tmp_path / "tfds"), max_image_pixels=bad)
    _one_line_error(excinfo, f"config.data.max_image_pixels={bad!r}: use a positive integer, or None")


# ---------------------------------------------------------------- single images


@pytest.mark.parametrize("lenient", [False, True])
@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("keep", ["header", "half", "all_but_eoi"])
def test_truncated_jpeg_is_undecodable_even_where_pil_is_told_to_accept_it(tmp_path, monkeypatch, lenient,
                                                                             progressive, keep):
    # TFDS sets LOAD_TRUNCATED_IMAGES=True when it draws a thumbnail; a build made after that must still
    # skip truncated files, or they would fail to decode later in a process where the flag is False.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lenient)
    data = _jpeg_bytes(_noise(64, 80), quality=90, progressive=progressive)
    cut = {"header": 200, "half": len(data) // 2, "all_but_eoi": len(data) - 2}[keep]
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[:cut])
    assert images.as_rgb_jpeg_bytes(str(path)) is None
    assert ImageFile.LOAD_TRUNCATED_IMAGES is lenient  # The caller's setting is restored.


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff", bytes(range(256)) * 8, b"<html>404 Not Found</html>"])
def test_empty_or_garbage_file_is_undecodable(tmp_path, content):
    path = tmp_path / "bird.jpg"
    path.write_bytes(content)
    assert images.as_rgb_jpeg_bytes(str(path)) is None


def _save_as(pixels, mode, fmt):
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if mode == "I;16":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("shape", [(1, 1), (1, 300), (300, 1), (2, 1)])
@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("P", "GIF"),
                                       ("1", "PNG"), ("I;16", "PNG"), ("LA", "PNG")])
def test_tiny_and_odd_images_become_rgb_jpegs_the_transforms_accept(tmp_path, shape, mode, fmt):
    path = tmp_path / "bird.jpg"
    path.write_bytes(_save_as(_noise(*shape), mode, fmt))
    stored = images.as_rgb_jpeg_bytes(str(path))
    with Image.open(io.BytesIO(stored)) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", shape[::-1])
        pixels = np.asarray(image)
    for size in (32, 224):
        views = pipeline.two_views(pixels, np.random.default_rng(0), size)
        assert [(v.shape, v.dtype) for v in views] == [((size, size, 3), np.uint8)] * 2
        evaluated = pipeline.eval_transform(pixels, size)
        assert (evaluated.shape, evaluated.dtype) == ((size, size, 3), np.uint8)


# ---------------------------------------------------------------- a folder full of bad images, built and read


BAD_TRAIN = {  # (class index, image number) -> what replaces the tiny fixture's JPEG there
    (0, 0): "rgb_1x1", (0, 1): "strip_1x300", (0, 2): "strip_300x1", (0, 3): "truncated",
    (1, 0): "zero_bytes", (1, 1): "garbage", (1, 2): "grey_png_1x1", (1, 3): "cmyk_1x1",
    (2, 0): "missing", (2, 1): "png16_in_jpg",
}
BAD_TEST = {(0, 6): "grey_1x1", (1, 6): "truncated_progressive"}
UNREADABLE = {"truncated", "zero_bytes", "garbage", "missing", "truncated_progressive"}


def _bad_image_bytes(kind):
    full = _jpeg_bytes(_noise(40, 48), quality=90)
    return {
        "rgb_1x1": lambda: _jpeg_bytes(_noise(1, 1)),
        "strip_1x300": lambda: _jpeg_bytes(_noise(1, 300)),
        "strip_300x1": lambda: _jpeg_bytes(_noise(300, 1)),
        "truncated": lambda: full[: len(full) // 2],
        "truncated_progressive": lambda: _jpeg_bytes(_noise(40, 48), progressive=True)[:-2],
        "zero_bytes": lambda: b"",
        "garbage": lambda: bytes(range(256)) * 4,
        "grey_png_1x1": lambda: _save_as(_noise(1, 1), "L", "PNG"),
        "grey_1x1": lambda: _save_as(_noise(1, 1), "L", "JPEG"),
        "cmyk_1x1": lambda: _save_as(_noise(1, 1), "CMYK", "JPEG"),
        "png16_in_jpg": lambda: _save_as(_noise(30, 20), "I;16", "PNG"),
    }[kind]()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def bad_build(tmp_path_factory):
    """The tiny CUB folder (18 train, 9 test) with BAD_TRAIN/BAD_TEST swapped in, built under the lenient
    PIL flag that TFDS may have set earlier in the process; returns (sources, info, file names, warnings)."""
    root = write_tiny_cub(str(tmp_path_factory.mktemp("bad") / "CUB_200_2011"))
    names = {}
    for bad, train in ((BAD_TRAIN, True), (BAD_TEST, False)):
        for (class_index, number), kind in bad.items():
            class_dir = f"{(2, 5, 9)[class_index]:03d}.Bird_{(2, 5, 9)[class_index]}"
            name = f"{class_dir}/Bird_{(2, 5, 9)[class_index]}_{number:04d}.jpg"
            path = os.path.join(root, "images", name)
            if kind == "missing":
                os.remove(path)
            else:
                open(path, "wb").write(_bad_image_bytes(kind))
            names[kind] = name
    records = _Records()
    builder._LOG.addHandler(records)
    lenient = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        sources, info = builder.load_sources(cub.DATA_SET, root, str(tmp_path_factory.mktemp("tfds")))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
        builder._LOG.removeHandler(records)
    return sources, info, names, records.messages


def test_bad_images_are_skipped_with_counted_warnings_and_odd_ones_kept(bad_build):
    sources, info, names, warnings = bad_build
    skipped_train = sorted(names[kind] for kind in BAD_TRAIN.values() if kind in UNREADABLE)
    assert info.skipped_files == {"train": tuple(skipped_train), "test": (names["truncated_progressive"],)}
    assert info.split_sizes == {"train": 18 - 4, "test": 9 - 1}
    undecodable_train = [name for name in skipped_train if name != names["missing"]]
    assert info.skipped_by_reason == {"train": {"missing": (names["missing"],), "undecodable": tuple(undecodable_train)},
                                      "test": {"undecodable": (names["truncated_progressive"],)}}
    assert f"CUB folder train split: skipped 3 undecodable images: {', '.join(undecodable_train)}" in warnings
    assert f"CUB folder train split: skipped 1 missing images: {names['missing']}" in warnings
    assert f"CUB folder test split: skipped 1 undecodable images: {names['truncated_progressive']}" in warnings
    kept = {sources[split][i]["file_name"].decode(): sources[split][i]["image"]
            for split in ("train", "test") for i in range(len(sources[split]))}
    expected_shapes = {"rgb_1x1": (1, 1, 3), "strip_1x300": (1, 300, 3), "strip_300x1": (300, 1, 3),
                       "grey_png_1x1": (1, 1, 3), "cmyk_1x1": (1, 1, 3), "png16_in_jpg": (30, 20, 3),
                       "grey_1x1": (1, 1, 3)}
    assert {kind: kept[names[kind]].shape for kind in expected_shapes} == expected_shapes


def test_train_pipeline_reads_every_kept_image_without_error(bad_build):
    sources, info, _, _ = bad_build
    assert info.split_sizes["train"] == 14  # batch 7: two batches are one epoch, every record once
    iterator = iter(pipeline.train_dataset(sources["train"], global_batch_size=7, image_size=32, seed=0,
                                           read_threads=1))
    batches = [next(iterator) for _ in range(2)]
    for batch in batches:
        assert batch["view1"].shape == batch["view2"].shape == (7, 32, 32, 3)
        assert batch["view1"].dtype == np.uint8
    assert sorted(np.concatenate([b["index"] for b in batches]).tolist()) == list(range(14))


def test_eval_pipeline_reads_every_kept_image_without_error(bad_build):
    sources, _, _, _ = bad_build
    for split in ("train", "test"):
        batches = list(pipeline.eval_batches(sources[split], batch_size=4, image_size=32, read_threads=1))
        images = np.concatenate([b["image"] for b in batches])
        mask = np.concatenate([b["mask"] for b in batches])
        assert images.shape[1:] == (32, 32, 3) and mask.sum() == len(sources[split])


# ---------------------------------------------------------------- an existing run survives bad input


def test_bad_data_folder_leaves_an_existing_runs_checkpoint_and_results_alone(tmp_path):
    from fgpair_jax import train  # Heavy import: only this test needs it.

    workdir = tmp_path / "run"
    kept = {"checkpoints/4/state/data": b"\x00checkpoint", "eval/metrics.json": b'{"linear_top1": 50.0}\n',
            "config.json": b"{}\n", "metrics.jsonl": b'{"step": 4, "loss": 1.0}\n'}
    for name, content in kept.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_bytes(content)
    empty = tmp_path / "CUB_200_2011"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as excinfo:
        train.train_and_evaluate(tiny_config(**{"data.manual_dir": str(empty)}), str(workdir))
    _one_line_error(excinfo, "is empty", "config.data.manual_dir")
    after = {str(p.relative_to(workdir)): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    assert after == kept


# ---------------------------------------------------------------- index files from other editors, odd folders


@pytest.mark.parametrize("file_name", cub.INDEX_FILES)
def test_index_file_with_a_utf8_byte_order_mark_is_read(tmp_path, file_name):
    """Windows Notepad and Excel save 'UTF-8' with a byte order mark: line 1 used to be "not '<id> <value>'"."""
    root = write_tiny_cub(str(tmp_path / "CUB_200_2011"), train_per_class=2, test_per_class=1)
    path = os.path.join(root, file_name)
    text = open(path, encoding="utf-8").read()
    open(path, "w", encoding="utf-8-sig").write(text)
    assert open(path, "rb").read(3) == b"\xef\xbb\xbf"
    sources, info = builder.load_sources(cub.DATA_SET, root, str(tmp_path / "tfds"))
    assert info.split_sizes == {"train": 6, "test": 3} and info.class_ids == (2, 5, 9)
    assert info.skipped_files == {"train": (), "test": ()}
    assert sorted(int(sources["train"][i]["image_id"]) for i in range(6)) == [1, 2, 4, 5, 7, 8]


def test_an_index_file_that_cannot_be_read_is_one_line_naming_it(tmp_path):
    root = write_tiny_cub(str(tmp_path / "CUB_200_2011"), train_per_class=1, test_per_class=1)
    os.remove(os.path.join(root, "classes.txt"))
    os.mkdir(os.path.join(root, "classes.txt"))  # e.g. an archive tool's odd output
    with pytest.raises(ValueError) as excinfo:
        builder.load_sources(cub.DATA_SET, root, str(tmp_path / "tfds"))
    _one_line_error(excinfo, "classes.txt cannot be read (Is a directory)", "config.data.manual_dir")


def test_files_changing_while_the_build_starts_is_one_line(tmp_path, monkeypatch):
    """The build's key (records, sizes, times) is computed twice: when the build's name is made and when it
    starts (possibly after waiting for another process's build). A change in between used to be a bare
    ValueError."""
    root = write_tiny_cub(str(tmp_path / "CUB_200_2011"), train_per_class=1, test_per_class=1)
    real = builder.build_key
    calls = []

    def changing(*args):
        calls.append(args)
        return real(*args) if len(calls) == 1 else "0123456789"

    monkeypatch.setattr(builder, "build_key", changing)
    with pytest.raises(cub.DataError) as excinfo:
        builder.load_sources(cub.DATA_SET, root, str(tmp_path / "tfds"))
    _one_line_error(excinfo, "files changed while the build was starting", "nothing was built", "rerun")


def test_names_differing_only_in_letter_case_are_missing_with_a_hint(tmp_path, caplog):
    """'.JPG' on disk for '.jpg' in images.txt stays a missing image (names match exactly or across Unicode
    normal forms only), but the warning says what is on disk instead of leaving the user to guess."""
    root = write_tiny_cub(str(tmp_path / "CUB_200_2011"), train_per_class=2, test_per_class=1)
    upper = FIRST[:-4] + ".JPG"
    os.rename(os.path.join(root, "images", FIRST), os.path.join(root, "images", upper))
    with caplog.at_level(logging.WARNING, logger=builder.__name__):
        _, info = builder.load_sources(cub.DATA_SET, root, str(tmp_path / "tfds"))
    assert info.skipped_by_reason == {"train": {"missing": (FIRST,)}, "test": {}}
    warning = next(m for m in caplog.messages if "missing images" in m)
    assert "\n" not in warning
    assert f"skipped 1 missing images: {FIRST} (1 of them is on disk in another letter case, e.g. " \
           f"{upper!r} for {FIRST!r}: correct images.txt or rename the files)" in warning


def test_a_split_without_any_file_on_disk_fails_before_any_image_is_decoded(tmp_path, monkeypatch):
    """Which listed files exist is known before the first image is read: a test split with none used to be
    found only after the whole train split had been decoded (minutes on the full CUB)."""
    root = write_tiny_cub(str(tmp_path / "CUB_200_2011"), train_per_class=2, test_per_class=1)
    for class_id in (2, 5, 9):
        os.remove(os.path.join(root, "images", f"{class_id:03d}.Bird_{class_id}", f"Bird_{class_id}_0002.jpg"))
    decoded = []
    real = images.load_rgb_jpeg
    monkeypatch.setattr(images, "load_rgb_jpeg", lambda *args: decoded.append(args) or real(*args))
    data_dir = tmp_path / "tfds"
    with pytest.raises(ValueError) as excinfo:
        builder.load_sources(cub.DATA_SET, root, str(data_dir))
    _one_line_error(excinfo, "none of the 3 test images", "could be read from images/", "3 missing",
                    "config.data.manual_dir")
    assert decoded == []
    assert not any(name.startswith("incomplete.") or name[0].isdigit()
                   for _, folders, _ in os.walk(data_dir) for name in folders)


# ---------------------------------------------------------------- the disk the build is written to


def _fail_writing_the_test_split(monkeypatch, error):
    """The ArrayRecord writer raises `error` after storing one example of the test split (the train split,
    written first, is complete inside TFDS's incomplete.* folder by then)."""
    from tensorflow_datasets.core import file_adapters

    adapter = file_adapters.ArrayRecordFileAdapter
    real = adapter.write_examples.__func__

    def write_examples(cls, path, iterator):
        if "-test." not in os.fspath(path):
            return real(cls, path, iterator)
        next(iter(iterator))
        raise error

    monkeypatch.setattr(adapter, "write_examples", classmethod(write_examples))


def _write_to_dev_full(monkeypatch):
    """The real writer, writing every shard to /dev/full: the failure a full disk gives (a RuntimeError from
    array_record's C++ writer whose text holds the operating system's reason)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    from tensorflow_datasets.core import file_adapters

    adapter = file_adapters.ArrayRecordFileAdapter
    real = adapter.write_examples.__func__
    monkeypatch.setattr(adapter, "write_examples", classmethod(lambda cls, path, it: real(cls, "/dev/full", it)))


@pytest.mark.parametrize("fail, reason", [
    (lambda mp, path: _fail_writing_the_test_split(mp, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)),
     os.strerror(errno.ENOSPC)),
    (lambda mp, path: _fail_writing_the_test_split(mp, OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), path)),
     os.strerror(errno.EDQUOT)),
    (lambda mp, path: _write_to_dev_full(mp), os.strerror(errno.ENOSPC)),
], ids=["enospc", "edquot", "dev_full"])
def test_a_full_disk_during_the_build_is_one_line_and_leaves_nothing_half_built(tmp_path, monkeypatch, fail, reason):
    """It used to end in a 64-line TFDS traceback (exit 1). Now: one line naming the folder written, the cause
    and the fix; no incomplete.* folder or partial build is left; the build then succeeds once there is room."""
    root = write_tiny_cub(str(tmp_path / "CUB_200_2011"), train_per_class=2, test_per_class=1)
    data_dir = str(tmp_path / "tfds")
    with monkeypatch.context() as patched:
        fail(patched, data_dir)
        with pytest.raises(OSError) as excinfo:
            builder.load_sources(cub.DATA_SET, root, data_dir)
    assert isinstance(excinfo.value, UserError)
    _one_line_error(excinfo, f"TFDS data_dir {data_dir!r}", f"({reason})", "Free space there",
                    "config.data.data_dir", "$TFDS_DATA_DIR", "nothing of it was kept")
    walked = [(os.path.relpath(top, data_dir), folders, files) for top, folders, files in os.walk(data_dir)]
    assert [file for _, _, files in walked for file in files if not file.endswith(".lock")] == [], walked
    assert not [name for _, folders, _ in walked for name in folders if "incomplete." in name], walked

    _, info = builder.load_sources(cub.DATA_SET, root, data_dir)
    assert info.split_sizes == {"train": 6, "test": 3}


def test_not_enough_free_space_for_the_images_fails_before_any_image_is_decoded(tmp_path, monkeypatch):
    """How much the build stores is known before it starts (valid RGB JPEGs are stored byte for byte): a disk
    with less room than the listed images take is refused before minutes of decoding are spent."""
    root = write_tiny_cub(str(tmp_path / "CUB_200_2011"), train_per_class=2, test_per_class=1)
    decoded = []
    real = images.load_rgb_jpeg
    monkeypatch.setattr(images, "load_rgb_jpeg", lambda *args: decoded.append(args) or real(*args))
    monkeypatch.setattr(builder.shutil, "disk_usage", lambda path: types.SimpleNamespace(total=10**9, used=10**9 - 100,
                                                                                      free=100))
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(OSError) as excinfo:
        builder.load_sources(cub.DATA_SET, root, data_dir)
    _one_line_error(excinfo, f"TFDS data_dir {data_dir!r}", "100 bytes are free", "Free space there",
                    "config.data.data_dir", "$TFDS_DATA_DIR")
    assert decoded == []


def test_a_data_dir_that_cannot_be_created_is_one_line_naming_it(tmp_path):
    root = write_tiny_cub(str(tmp_path / "CUB_200_2011"), train_per_class=1, test_per_class=1)
    data_dir = tmp_path / "tfds"
    data_dir.write_text("a file where the data folder should be")
    with pytest.raises(OSError) as excinfo:
        builder.load_sources(cub.DATA_SET, root, str(data_dir))
    _one_line_error(excinfo, f"TFDS data_dir {str(data_dir)!r}", "(Not a directory)", "config.data.data_dir",
                    "$TFDS_DATA_DIR")


FULL_DISK_CLI = """
import os, runpy, sys
from tensorflow_datasets.core import file_adapters
adapter = file_adapters.ArrayRecordFileAdapter
real = adapter.write_examples.__func__
adapter.write_examples = classmethod(lambda cls, path, it: real(cls, "/dev/full", it))
sys.argv = ["fgpair_jax.main", *sys.argv[1:]]
runpy.run_module("fgpair_jax.main", run_name="__main__")
"""


def test_a_full_disk_during_the_build_is_one_line_from_the_cli(tmp_path):
    import subprocess
    import sys

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    root = write_tiny_cub(str(tmp_path / "CUB_200_2011"), train_per_class=1, test_per_class=1)
    data_dir = str(tmp_path / "tfds")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK_CLI, "--config=configs/cub.py:tiny", f"--workdir={tmp_path / 'run'}",
         f"--config.data.manual_dir={root}", f"--config.data.data_dir={data_dir}"],
        cwd=repo, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"TFDS data_dir {data_dir!r} (No space left on device)" in errors[0], result.stderr


def test_a_folder_that_cannot_be_listed_is_one_line_naming_it(tmp_path, monkeypatch):
    root = write_tiny_cub(str(tmp_path / "CUB_200_2011"), train_per_class=1, test_per_class=1)
    real = os.listdir

    def refusing(path="."):
        if os.fspath(path) == root:
            raise PermissionError(13, "Permission denied", root)
        return real(path)

    monkeypatch.setattr(os, "listdir", refusing)  # as for a folder of another user (the tests may run as root)
    with pytest.raises(ValueError) as excinfo:
        builder.load_sources(cub.DATA_SET, root, str(tmp_path / "tfds"))
    _one_line_error(excinfo, f"CUB folder {root!r}: cannot be listed (Permission denied)", "config.data.manual_dir")
