"""The mechanism control's nuisance (data/nuisance.py): shared by an image's views, resampled by the oracle."""
import numpy as np
import pytest

from fgpair_jax.data import nuisance as nuisance_lib
from fgpair_jax.errors import ConfigError

PANEL = nuisance_lib.Nuisance(kind="panel", crop_fraction=0.5, tiles=4, tint_std=0.0)


def views(seed=0, size=32):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size, 3), np.uint8), rng.integers(0, 256, (size, size, 3), np.uint8)


def border(image):
    """The pixels outside the pasted centre (crop_fraction 0.5 of 32: rows/cols 8..24 are the view)."""
    mask = np.ones(image.shape[:2], bool)
    mask[8:24, 8:24] = False
    return image[mask]


def test_both_views_of_an_image_share_its_panel_and_tint_and_other_images_differ():
    v1, v2 = views()
    a1, a2 = nuisance_lib.two_views(v1, v2, 7, np.random.default_rng(1), PANEL)
    np.testing.assert_array_equal(border(a1), border(a2))
    b1, _ = nuisance_lib.two_views(v1, v2, 7, np.random.default_rng(99), PANEL)  # the step's rng plays no part
    np.testing.assert_array_equal(border(a1), border(b1))
    c1, _ = nuisance_lib.two_views(v1, v2, 8, np.random.default_rng(1), PANEL)
    assert np.mean(border(a1) != border(c1)) > 0.5
    assert not np.array_equal(a1[8:24, 8:24], a2[8:24, 8:24])  # the centres are the two views, shrunk


def test_the_oracle_resamples_the_nuisance_per_view():
    oracle = nuisance_lib.Nuisance(kind="panel", views="resampled", crop_fraction=0.5, tint_std=0.05)
    v1, v2 = views()
    a1, a2 = nuisance_lib.two_views(v1, v2, 7, np.random.default_rng(1), oracle)
    assert np.mean(border(a1) != border(a2)) > 0.5


def test_the_view_is_shrunk_into_the_centre_and_the_tint_shifts_every_pixel():
    view = np.full((32, 32, 3), 100, np.uint8)
    panel = np.zeros((32, 32, 3), np.uint8)
    out = nuisance_lib.apply(view, panel, np.zeros(3, np.float32), 0.5)
    assert (out[8:24, 8:24] == 100).all() and (border(out) == 0).all()
    tinted = nuisance_lib.apply(view, panel, np.array([0.1, 0.0, -0.1], np.float32), 0.5)
    np.testing.assert_array_equal(tinted[16, 16], [126, 100, 74])
    np.testing.assert_array_equal(tinted[0, 0], [26, 0, 0])  # clipped at 0


def test_eval_images_carry_their_own_nuisance_and_none_changes_nothing():
    image, _ = views()
    first = nuisance_lib.eval_image(image, 3, PANEL)
    np.testing.assert_array_equal(first, nuisance_lib.eval_image(image, 3, PANEL))
    assert not np.array_equal(border(first), border(nuisance_lib.eval_image(image, 4, PANEL)))
    none = nuisance_lib.Nuisance()
    assert nuisance_lib.eval_image(image, 3, none) is image
    v1, v2 = views()
    assert nuisance_lib.two_views(v1, v2, 0, np.random.default_rng(0), none) == (v1, v2)


@pytest.mark.parametrize("field,value", [("kind", "stripes"), ("views", "both"), ("crop_fraction", 0.0),
                                         ("tiles", 0), ("tint_std", -0.1)])
def test_out_of_range_knobs_are_one_line_errors(field, value):
    with pytest.raises(ConfigError, match=f"config.nuisance.{field}"):
        nuisance_lib.validate(nuisance_lib.Nuisance(**{"kind": "panel", **{field: value}}))


def test_the_pipelines_put_the_nuisance_on_training_views_and_evaluation_images():
    from fgpair_jax.data import pipeline

    rng = np.random.default_rng(0)
    source = [{"image": rng.integers(0, 256, (40, 48, 3), np.uint8), "label": i % 2} for i in range(8)]
    shared = nuisance_lib.Nuisance(kind="panel", crop_fraction=0.5, tint_std=0.0)
    batch = next(iter(pipeline.train_dataset(source, global_batch_size=4, image_size=32, seed=0, read_threads=1,
                                             nuisance=shared)))
    for view1, view2, record in zip(batch["view1"], batch["view2"], batch["index"]):
        np.testing.assert_array_equal(border(view1), border(view2))
        panel, _ = nuisance_lib.draw(nuisance_lib.image_rng(nuisance_lib.TRAIN_STREAM, int(record)), 32, shared)
        np.testing.assert_array_equal(border(view1), border(panel))
    plain = next(iter(pipeline.train_dataset(source, global_batch_size=4, image_size=32, seed=0, read_threads=1)))
    assert not np.array_equal(border(plain["view1"][0]), border(batch["view1"][0]))
    images = next(iter(pipeline.eval_batches(source, batch_size=8, image_size=32, read_threads=1, nuisance=shared,
                                             nuisance_stream=nuisance_lib.stream_of("train"))))["image"]
    panel, _ = nuisance_lib.draw(nuisance_lib.image_rng(nuisance_lib.TRAIN_STREAM, 5), 32, shared)
    np.testing.assert_array_equal(border(images[5]), border(panel))  # a train image keeps its training panel
