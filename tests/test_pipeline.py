"""Tests for the grain host pipeline: crop semantics, eval transform, determinism, sharding, checkpoints."""

import math

import numpy as np
import pytest

from fgpair_jax.data import pipeline

SIZE = 16


def _coordinate_image(height, width):
    """Channel 0 holds the column, channel 1 the row: a crop reveals where it came from."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([cols, rows, np.zeros_like(rows)], axis=-1).astype(np.uint8)


def _source(num_examples=22, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.integers(0, 256, (int(rng.integers(20, 60)), int(rng.integers(20, 60)), 3), dtype=np.uint8),
            "label": i % 5,
        }
        for i in range(num_examples)
    ]


def _first_batches(source, count, **kwargs):
    arguments = dict(global_batch_size=8, image_size=SIZE, seed=3)
    arguments.update(kwargs)
    iterator = iter(pipeline.train_dataset(source, **arguments))
    return [next(iterator) for _ in range(count)]


def _assert_batches_equal(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_crop_box_honours_scale_ratio_and_bounds():
    rng = np.random.default_rng(0)
    height, width = 120, 200
    for _ in range(500):
        top, left, crop_height, crop_width = pipeline.sample_crop_box(height, width, rng, (0.2, 1.0))
        assert 0 <= top and top + crop_height <= height and 0 <= left and left + crop_width <= width
        area_fraction = crop_height * crop_width / (height * width)
        assert 0.2 - 0.02 <= area_fraction <= 1.0
        # Rounding each side to integers moves the aspect ratio by at most about 1/side.
        slack = 1 / crop_height + 1 / crop_width
        assert 3 / 4 - slack <= crop_width / crop_height <= 4 / 3 + slack


def test_crop_box_falls_back_to_ratio_clamped_centre_crop():
    rng = np.random.default_rng(0)
    # A 10x400 strip can never hold a box of aspect <= 4/3 with >= 90% of its area: fallback.
    assert pipeline.sample_crop_box(10, 400, rng, (0.9, 1.0)) == (0, 193, 10, 13)
    assert pipeline.sample_crop_box(400, 10, rng, (0.9, 1.0)) == (193, 0, 13, 10)


def test_random_resized_crop_returns_the_sampled_box_resized():
    image = _coordinate_image(150, 200)
    box_rng, crop_rng = np.random.default_rng(7), np.random.default_rng(7)
    top, left, crop_height, crop_width = pipeline.sample_crop_box(150, 200, box_rng)
    crop = pipeline.random_resized_crop(image, crop_rng, SIZE)
    assert crop.shape == (SIZE, SIZE, 3) and crop.dtype == np.uint8
    cols, rows = crop[..., 0].astype(float), crop[..., 1].astype(float)
    step_x, step_y = crop_width / SIZE, crop_height / SIZE  # Pixel centres land half a step inside the box.
    assert abs(cols.min() - (left + step_x / 2 - 0.5)) <= 1.5 and abs(cols.max() - (left + crop_width - step_x / 2 - 0.5)) <= 1.5
    assert abs(rows.min() - (top + step_y / 2 - 0.5)) <= 1.5 and abs(rows.max() - (top + crop_height - step_y / 2 - 0.5)) <= 1.5


def test_two_views_flip_independently_half_the_time():
    # With scale (1, 1) a square image's only box is the whole image, so each view is it or its mirror.
    image = _coordinate_image(12, 12)
    rng = np.random.default_rng(0)
    flips = []
    for _ in range(300):
        for view in pipeline.two_views(image, rng, 12, scale=(1.0, 1.0)):
            mirrored = not np.array_equal(view, image)
            if mirrored:
                np.testing.assert_array_equal(view, image[:, ::-1])
            flips.append(mirrored)
    flips = np.array(flips).reshape(300, 2)
    assert 0.4 <= flips.mean() <= 0.6
    assert 0.35 <= np.mean(flips[:, 0] != flips[:, 1]) <= 0.65  # Views flip independently.


def test_crop_rejects_non_rgb_input():
    with pytest.raises(ValueError, match=r"uint8 \[H,W,3\]"):
        pipeline.random_resized_crop(np.zeros((10, 10), np.uint8), np.random.default_rng(0), SIZE)


@pytest.mark.parametrize("shape", [(150, 200), (200, 150), (64, 64), (300, 90)])
def test_eval_transform_resizes_short_side_then_centre_crops(shape):
    image = _coordinate_image(*shape)
    out = pipeline.eval_transform(image, 112)
    assert out.shape == (112, 112, 3) and out.dtype == np.uint8
    # Short side -> 128 px, so the kept centre spans 112/128 of the short side around the image centre.
    scale = min(shape) / 128
    centre_col, centre_row = out[56, 56, 0].astype(float), out[56, 56, 1].astype(float)
    assert abs(centre_col - shape[1] / 2) <= scale + 1 and abs(centre_row - shape[0] / 2) <= scale + 1
    span = (out[..., 0].max() - out[..., 0].min()) if shape[1] <= shape[0] else (out[..., 1].max() - out[..., 1].min())
    assert abs(span - min(shape) * 112 / 128) <= 2 * scale + 1


def test_train_batches_have_two_uint8_views():
    batch = _first_batches(_source(), 1)[0]
    assert batch["view1"].shape == batch["view2"].shape == (8, SIZE, SIZE, 3)
    assert batch["view1"].dtype == batch["view2"].dtype == np.uint8
    assert batch["label"].dtype == batch["index"].dtype == np.int32 and batch["label"].shape == (8,)
    assert not np.array_equal(batch["view1"], batch["view2"])  # Independent augmentations.
    source = _source()
    np.testing.assert_array_equal(batch["label"], [source[i]["label"] for i in batch["index"]])


def test_same_seed_same_batches_regardless_of_threads_and_other_seed_differs():
    source = _source()
    reference = _first_batches(source, 3, read_threads=1)
    _assert_batches_equal(reference, _first_batches(source, 3, read_threads=4))
    other = _first_batches(source, 3, seed=4)
    assert not np.array_equal(reference[0]["index"], other[0]["index"])
    assert not np.array_equal(reference[0]["view1"], other[0]["view1"])


def test_each_epoch_visits_distinct_records_and_reshuffles():
    source = _source(22)
    steps = pipeline.steps_per_epoch(len(source), 8)
    assert steps == 2
    batches = _first_batches(source, 2 * steps)
    epochs = [np.concatenate([b["index"] for b in batches[e * steps : (e + 1) * steps]]) for e in range(2)]
    for indices in epochs:
        assert len(set(indices.tolist())) == steps * 8
    assert not np.array_equal(epochs[0], epochs[1])


def test_finite_epochs_stop():
    batches = list(pipeline.train_dataset(_source(22), global_batch_size=8, image_size=SIZE, seed=0, num_epochs=2))
    assert len(batches) == 4


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_batches_concatenate_to_the_global_batch(process_count):
    source = _source()
    global_batches = _first_batches(source, 3)
    local = [_first_batches(source, 3, process_index=p, process_count=process_count) for p in range(process_count)]
    for step, global_batch in enumerate(global_batches):
        for key in global_batch:
            joined = np.concatenate([local[p][step][key] for p in range(process_count)])
            np.testing.assert_array_equal(joined, global_batch[key], err_msg=key)


def test_indivisible_global_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        pipeline.train_dataset(_source(), global_batch_size=8, image_size=SIZE, seed=0, process_count=3)


@pytest.mark.parametrize("worker_count", [0, 2, 3])
def test_starting_at_a_step_yields_that_step_s_batches_with_any_worker_count(worker_count):
    """What a resumed run relies on (train.py): batch g does not depend on where the iterator started, on
    the worker count, or on how the batch is split over processes."""
    from absl import flags

    source = _source()
    expected = _first_batches(source, 5)[3:]
    was_parsed = flags.FLAGS.is_parsed()
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    try:
        started = iter(pipeline.train_dataset(source, global_batch_size=8, image_size=SIZE, seed=3, start_step=3,
                                              worker_count=worker_count))
        _assert_batches_equal(expected, [next(started) for _ in range(2)])
    finally:
        if not was_parsed:
            flags.FLAGS.unparse_flags()
    halves = [_first_batches(source, 2, start_step=3, process_index=p, process_count=2) for p in (0, 1)]
    for step, batch in enumerate(expected):
        np.testing.assert_array_equal(np.concatenate([halves[0][step]["index"], halves[1][step]["index"]]),
                                      batch["index"])
    assert pipeline.train_position(3) == {"next_index": 3}


def test_restored_iterator_yields_the_identical_next_batches():
    source = _source()
    iterator = iter(pipeline.train_dataset(source, global_batch_size=8, image_size=SIZE, seed=5))
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(2)]
    restored = iter(pipeline.train_dataset(source, global_batch_size=8, image_size=SIZE, seed=5))
    restored.set_state(state)
    _assert_batches_equal(expected, [next(restored) for _ in range(2)])


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_once_with_padding_masked(process_count):
    source = _source(21)
    per_process = [
        list(pipeline.eval_batches(source, batch_size=8, image_size=SIZE, process_index=p, process_count=process_count))
        for p in range(process_count)
    ]
    assert len({len(batches) for batches in per_process}) == 1 and len(per_process[0]) == math.ceil(21 / 8)
    seen = []
    for batches in per_process:
        for batch in batches:
            assert batch["image"].shape == (8 // process_count, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
            assert batch["mask"].dtype == np.bool_ and batch["label"].dtype == np.int32
            assert np.all(batch["image"][~batch["mask"]] == 0) and np.all(batch["label"][~batch["mask"]] == -1)
            seen.extend(batch["index"][batch["mask"]].tolist())
            for row in np.flatnonzero(batch["mask"]):
                expected = pipeline.eval_transform(source[batch["index"][row]]["image"], SIZE)
                np.testing.assert_array_equal(batch["image"][row], expected)
    assert sorted(seen) == list(range(21))
