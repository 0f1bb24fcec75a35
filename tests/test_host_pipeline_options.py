"""The host pipeline's cost options (issue 27): OpenCV resampling, reduced-size JPEG decoding, smaller stored
copies, the decoded-image cache and the worker default. Each must leave what the encoder sees as it was,
up to resampling: the same crop geometry from the same draws, pixels within a few grey levels."""

import gc
import io
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from fgpair_jax import run_config
from fgpair_jax.data import builder, cub, decoded_cache, images, jpeg, pipeline, synthetic
from fgpair_jax.errors import ConfigError


def _smooth_image(height, width):
    """uint8 [H,W,3] gradients with a soft disc: photo-like (no pixel noise), so resampling agrees closely."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    disc = 80 * np.exp(-(((rows - height / 3) ** 2 + (cols - width / 2) ** 2) / (2 * (min(height, width) / 5) ** 2)))
    image = np.stack([cols / width * 200 + disc, rows / height * 180, (rows + cols) / (height + width) * 150 + disc],
                     axis=-1)
    return np.clip(image, 0, 255).astype(np.uint8)


def _jpeg(image, **save):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95, **save)
    return buffer.getvalue()


def _mean_abs(first, second):
    return float(np.abs(first.astype(np.int32) - second.astype(np.int32)).mean())


@pytest.mark.parametrize("size", [224, 112])  # 227-px images: mostly enlarged at 224, shrunk at 112
def test_opencv_views_use_the_same_draws_and_stay_within_a_grey_level_or_two_of_pil(size):
    image = _smooth_image(227, 300)
    for seed in range(6):
        reference_rng, opencv_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        reference = pipeline.two_views(image, reference_rng, size, resize_with="pil")
        fast = pipeline.two_views(image, opencv_rng, size, resize_with="opencv")
        assert reference_rng.random() == opencv_rng.random()  # the same number of draws: later ones unchanged
        for view, fast_view in zip(reference, fast):
            assert fast_view.shape == view.shape == (size, size, 3) and fast_view.dtype == np.uint8
            assert _mean_abs(view, fast_view) < 2.0, (seed, size)  # a flipped or shifted view is tens of levels off


def test_unknown_resampler_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="view_resize='cv2'"):
        pipeline.two_views(_smooth_image(40, 40), np.random.default_rng(0), 16, resize_with="cv2")


def test_encoded_image_decodes_to_pil_s_pixels_ignoring_exif_orientation():
    image = _smooth_image(60, 90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees": PIL's plain decode (and so every build reader) ignores it
    data = _jpeg(image, exif=exif)
    np.testing.assert_array_equal(np.asarray(jpeg.EncodedImage(data)), np.asarray(Image.open(io.BytesIO(data))))
    encoded = jpeg.EncodedImage(data)
    narrowed = encoded[5:40, 10:]  # as crops.py cuts a decoded image
    assert narrowed.shape == (35, 80, 3)
    np.testing.assert_array_equal(np.asarray(narrowed), np.asarray(encoded)[5:40, 10:])
    with pytest.raises(TypeError, match="decode it first"):
        encoded[::2]


def test_reduction_is_the_largest_that_keeps_every_crop_at_the_output_size():
    assert jpeg.reduction_for([(0, 0, 500, 460), (9, 9, 470, 480)], 112) == 4
    assert jpeg.reduction_for([(0, 0, 500, 460), (9, 9, 223, 300)], 112) == 1
    assert jpeg.reduction_for([(0, 0, 224, 230)], 112) == 2
    assert jpeg.reduction_for([(0, 0, 2000, 2000)], 64) == 8


@pytest.mark.parametrize("resize_with", ["pil", "opencv"])
def test_reduced_decoding_gives_the_full_decode_s_views_within_resampling(resize_with):
    image = _smooth_image(480, 640)
    data = _jpeg(image)
    full = np.asarray(Image.open(io.BytesIO(data)))
    encoded, size, reduced = jpeg.EncodedImage(data), 64, 0
    for seed in range(8):
        draws, boxes = np.random.default_rng(seed), []
        for _ in range(2):  # two_views' draws: a box, then the flip
            boxes.append(pipeline.sample_crop_box(480, 640, draws))
            draws.random()
        reduced += jpeg.reduction_for(boxes, size) > 1
        views = pipeline.two_views(full, np.random.default_rng(seed), size, resize_with=resize_with)
        cheap = pipeline.two_views(encoded, np.random.default_rng(seed), size, resize_with=resize_with)
        for view, cheap_view in zip(views, cheap):
            assert _mean_abs(view, cheap_view) < 2.0, seed
    assert reduced >= 4  # the reduced decode was exercised
    # A read-time crop (crops.py) of an encoded image: the region's views, as from the cut array.
    region = pipeline.two_views(encoded[40:440, 100:600], np.random.default_rng(1), size, resize_with=resize_with)
    cut = pipeline.two_views(np.ascontiguousarray(full[40:440, 100:600]), np.random.default_rng(1), size,
                             resize_with=resize_with)
    for view, cut_view in zip(region, cut):
        assert _mean_abs(view, cut_view) < 2.0


def test_stored_copies_keep_the_crop_geometry_and_the_views_within_resampling(tmp_path):
    image = _smooth_image(400, 600)
    path = tmp_path / "big.jpg"
    path.write_bytes(_jpeg(image))
    stored = images.load_rgb_jpeg(str(path), short_side=256)
    assert (stored.height, stored.width) == (256, 384) and stored.scale == pytest.approx(0.64)
    assert not stored.downscaled  # that flag is Pillow's pixel limit, reported separately
    assert Image.open(io.BytesIO(stored.data)).size == (384, 256)
    small = tmp_path / "small.jpg"
    small.write_bytes(_jpeg(_smooth_image(200, 300)))
    assert images.load_rgb_jpeg(str(small), short_side=256).data == small.read_bytes()  # never enlarged

    full = np.asarray(Image.open(path))
    copy = np.asarray(Image.open(io.BytesIO(stored.data)))
    for seed in range(10):
        box = pipeline.sample_crop_box(400, 600, np.random.default_rng(seed))
        copy_box = pipeline.sample_crop_box(256, 384, np.random.default_rng(seed))
        # The same relative box, up to rounding to whole pixels of the smaller copy.
        np.testing.assert_allclose(np.array(copy_box) / 256, np.array(box) / 400, atol=2 / 256)
        views = pipeline.two_views(full, np.random.default_rng(seed), 224)
        copy_views = pipeline.two_views(copy, np.random.default_rng(seed), 224)
        for view, copy_view in zip(views, copy_views):
            assert _mean_abs(view, copy_view) < 3.0, seed


def test_stored_short_side_is_part_of_the_build_key(tmp_path):
    folder = synthetic.write_tiny_cub(str(tmp_path / "CUB_200_2011"))
    default = builder.build_config(cub.DATA_SET, folder)
    names = {short: builder.build_config(cub.DATA_SET, folder, stored_short_side=short) for short in (0, 64, 96)}
    assert names[0].name == default.name  # builds made before the option keep their key and folder
    assert len({config.key for config in names.values()}) == 3
    assert names[64].name.endswith("_short64px") and names[64].key != default.key


def test_config_knobs_are_checked_in_one_line():
    run_config.validate(tiny_config(**{"data.view_resize": "opencv", "data.stored_short_side": 32,
                                       "data.reduced_decode": True, "data.cache_gib": 0.5}))
    for overrides, words in (({"data.stored_short_side": 16}, "stored_short_side=16: use 0"),
                             ({"data.view_resize": "cv2"}, "view_resize='cv2'"),
                             ({"data.cache_gib": -1.0}, "cache_gib=-1.0 must be >= 0"),
                             ({"data.worker_count": -2}, "worker_count=-2 must be >= 0, or -1")):
        with pytest.raises(ConfigError, match=words) as raised:
            run_config.validate(tiny_config(**overrides))
        assert "\n" not in str(raised.value)


def _records(count=6):
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8), "label": i % 3} for i in range(count)]


def test_decoded_cache_refuses_in_one_line_when_the_images_exceed_the_budget():
    records = _records()  # about 12 kB of pixels
    with pytest.raises(ConfigError, match=r"config.data.cache_gib=1e-06: the train split's 6 decoded images take "
                                          r"more") as raised:
        decoded_cache.decoded_cache(records, 1e-6)  # ~1 kB
    assert "\n" not in str(raised.value)
    assert decoded_cache.decoded_cache(records, 0) is records  # 0: no cache


def test_decoded_cache_holds_the_same_records_and_shares_them_with_worker_processes():
    records = _records()
    cache = decoded_cache.decoded_cache(records, 0.001)
    assert len(cache) == len(records) and cache.nbytes == sum(r["image"].nbytes for r in records)
    for record, cached in zip(records, cache):
        np.testing.assert_array_equal(cached["image"], record["image"])
        assert cached["label"] == record["label"] and not cached["image"].flags.writeable
    attached = pickle.loads(pickle.dumps(cache))  # what a grain worker process receives: the block's name
    np.testing.assert_array_equal(attached[3]["image"], records[3]["image"])
    block = os.path.join(decoded_cache.SHARED_MEMORY_DIR, cache._block_name)
    assert os.path.exists(block)
    del attached, cache
    gc.collect()
    assert not os.path.exists(block)  # the owner removed it


def test_cached_encoded_records_feed_the_same_batches_as_decoded_ones():
    files = [_jpeg(_smooth_image(40 + 4 * i, 48)) for i in range(16)]
    decoded = [{"image": np.asarray(Image.open(io.BytesIO(data))), "label": i % 3} for i, data in enumerate(files)]
    encoded = [{"image": jpeg.EncodedImage(data), "label": i % 3} for i, data in enumerate(files)]
    cache = decoded_cache.decoded_cache(encoded, 0.01)  # decodes each EncodedImage in full: the same pixels

    def first(source):
        return next(iter(pipeline.train_dataset(source, global_batch_size=8, image_size=16, seed=1)))

    expected, got = first(decoded), first(cache)
    for key in expected:
        np.testing.assert_array_equal(expected[key], got[key], err_msg=key)


def test_default_worker_count_is_none_on_cpu_and_a_core_each_on_accelerators():
    assert pipeline.default_worker_count("cpu") == 0
    assert pipeline.default_worker_count("gpu") == len(os.sched_getaffinity(0)) >= 1
