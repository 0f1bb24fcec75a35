"""Tests for fgpair_jax.data.augment: each op against a slow PIL / colorsys / numpy reference, then the
MoCo v2 recipe's probabilities, determinism, per-image independence and sharding invariance."""
import colorsys
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from conftest import xla_flags
from fgpair_jax.data import augment

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIL_TOLERANCE = 2.0 / 255.0  # PIL works in uint8 with its own rounding at each step

# One jitted entry point for the recipe tests: eager vmap of the recipe compiles op by op and is slow.
augment_jit = jax.jit(augment.mocov2_photometric,
                      static_argnames=("jitter_prob", "grayscale_prob", "blur_prob"))


def random_uint8_images(seed, batch=4, side=16):
    return np.random.default_rng(seed).integers(0, 256, (batch, side, side, 3), dtype=np.uint8)


def as_unit(image_uint8):
    return jnp.asarray(image_uint8, jnp.float32) / 255.0


def pil_enhance(image_uint8, enhancer, factor):
    return np.asarray(enhancer(Image.fromarray(image_uint8)).enhance(factor), np.float32) / 255.0


def unnormalize(images):
    """Back from ImageNet-normalised floats to [0, 1], to inspect what the augmentation did."""
    return np.asarray(images) * np.array(augment.IMAGENET_STD) + np.array(augment.IMAGENET_MEAN)


# ----------------------------------------------------------------------------- normalisation


def test_normalize_matches_numpy_formula():
    images = random_uint8_images(0)
    expected = (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    out = augment.normalize(jnp.asarray(images))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_normalize_rejects_float_input_with_one_line_error():
    with pytest.raises(ValueError, match=r"expected uint8 images") as info:
        augment.normalize(jnp.zeros((1, 8, 8, 3), jnp.float32))
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- colour building blocks


def test_to_grayscale_matches_luma_formula_and_pil():
    image = random_uint8_images(1, batch=1)[0]
    gray = np.asarray(augment.to_grayscale(as_unit(image)))
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
    np.testing.assert_allclose(gray, np.repeat(luma[..., None], 3, -1), atol=1e-6)
    pil_luma = np.asarray(Image.fromarray(image).convert("L"), np.float32) / 255.0
    np.testing.assert_allclose(gray[..., 0], pil_luma, atol=1.0 / 255.0)


@pytest.mark.parametrize("factor", [0.6, 1.35])
@pytest.mark.parametrize("name, enhancer", [
    ("adjust_brightness", ImageEnhance.Brightness),
    ("adjust_contrast", ImageEnhance.Contrast),
    ("adjust_saturation", ImageEnhance.Color),
])
def test_colour_adjustments_match_pil(name, enhancer, factor):
    # Tinted so channel means differ: a per-channel (instead of luma) mean would fail the contrast case.
    image = (random_uint8_images(2, batch=1)[0] * np.array([1.0, 0.6, 0.25])).astype(np.uint8)
    out = np.asarray(getattr(augment, name)(as_unit(image), factor))
    np.testing.assert_allclose(out, pil_enhance(image, enhancer, factor), atol=PIL_TOLERANCE)


def test_rgb_to_hsv_matches_colorsys_and_round_trips():
    pixels = np.array([[0.2, 0.5, 0.9], [0.9, 0.1, 0.1], [0.3, 0.3, 0.3], [0.0, 0.0, 0.0],
                       [1.0, 1.0, 0.0], [0.1, 0.8, 0.8], [0.6, 0.2, 0.7], [0.5, 0.5, 0.2]], np.float32)
    hsv = np.asarray(augment.rgb_to_hsv(jnp.asarray(pixels)))
    expected = np.array([colorsys.rgb_to_hsv(*p) for p in pixels.astype(np.float64)])
    np.testing.assert_allclose(hsv, expected, atol=1e-6)
    np.testing.assert_allclose(np.asarray(augment.hsv_to_rgb(jnp.asarray(hsv))), pixels, atol=1e-6)


@pytest.mark.parametrize("shift", [-0.1, 0.07, 0.5])
def test_adjust_hue_matches_colorsys(shift):
    image = random_uint8_images(3, batch=1)[0].astype(np.float64) / 255.0
    out = np.asarray(augment.adjust_hue(jnp.asarray(image, jnp.float32), shift))
    expected = np.empty_like(image)
    for index in np.ndindex(image.shape[:2]):
        hue, sat, val = colorsys.rgb_to_hsv(*image[index])
        expected[index] = colorsys.hsv_to_rgb((hue + shift) % 1.0, sat, val)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_identity_settings_leave_image_unchanged():
    image = as_unit(random_uint8_images(4, batch=1)[0])
    for name in ("adjust_brightness", "adjust_contrast", "adjust_saturation"):
        np.testing.assert_allclose(getattr(augment, name)(image, 1.0), image, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(augment.adjust_hue(image, 0.0), image, atol=1e-6)


def test_saturation_zero_gives_grayscale_and_contrast_zero_gives_mean_luma():
    image = as_unit(random_uint8_images(5, batch=1)[0])
    gray = augment.to_grayscale(image)
    np.testing.assert_allclose(augment.adjust_saturation(image, 0.0), gray, atol=1e-6)
    mean_gray = jnp.full_like(image, gray.mean())
    np.testing.assert_allclose(augment.adjust_contrast(image, 0.0), mean_gray, atol=1e-6)


def test_brightness_contrast_saturation_commute_without_clipping():
    """Backs the module's claim that a fixed jitter order loses little: these three commute."""
    image = jnp.asarray(np.random.default_rng(15).uniform(0.35, 0.65, (16, 16, 3)), jnp.float32)
    ops = [lambda x: augment.adjust_brightness(x, 1.2), lambda x: augment.adjust_contrast(x, 0.7),
           lambda x: augment.adjust_saturation(x, 1.3)]
    for first, second in ((0, 1), (0, 2), (1, 2)):
        np.testing.assert_allclose(ops[first](ops[second](image)), ops[second](ops[first](image)),
                                   atol=1e-6)
    # ...while hue does not commute with saturation (luma changes with hue): its position matters.
    hue_then_saturation = ops[2](augment.adjust_hue(image, 0.1))
    saturation_then_hue = augment.adjust_hue(ops[2](image), 0.1)
    assert np.abs(np.asarray(hue_then_saturation - saturation_then_hue)).max() > 1e-3


# ----------------------------------------------------------------------------- blur


def numpy_gaussian_blur(image, sigma, width):
    """Direct 2-D correlation with the outer-product kernel and explicit reflect indexing."""
    half = width // 2
    taps = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    kernel = np.outer(taps, taps) / taps.sum() ** 2

    def reflect(index, size):
        index = abs(index)
        return 2 * (size - 1) - index if index >= size else index

    height, wid = image.shape[:2]
    out = np.zeros_like(image, dtype=np.float64)
    for row in range(height):
        for col in range(wid):
            for dr in range(width):
                for dc in range(width):
                    source = image[reflect(row + dr - half, height), reflect(col + dc - half, wid)]
                    out[row, col] += kernel[dr, dc] * source
    return out


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_gaussian_blur_matches_numpy_reference(sigma):
    image = random_uint8_images(6, batch=1)[0].astype(np.float64) / 255.0
    out = np.asarray(augment.gaussian_blur(jnp.asarray(image, jnp.float32), sigma, kernel_size=5))
    np.testing.assert_allclose(out, numpy_gaussian_blur(image, sigma, 5), atol=1e-5)


def test_gaussian_blur_keeps_constant_image_and_tiny_sigma_is_identity():
    constant = jnp.full((16, 16, 3), 0.3, jnp.float32)
    np.testing.assert_allclose(augment.gaussian_blur(constant, 1.5), constant, atol=1e-6)
    image = as_unit(random_uint8_images(7, batch=1)[0])
    np.testing.assert_allclose(augment.gaussian_blur(image, 0.1, kernel_size=5), image, atol=1e-6)


def test_blur_kernel_size_is_ten_percent_and_odd():
    assert [augment.blur_kernel_size(s) for s in (224, 112, 96, 16)] == [23, 11, 9, 3]


def test_gaussian_blur_rejects_even_kernel():
    with pytest.raises(ValueError, match="must be odd"):
        augment.gaussian_blur(jnp.zeros((16, 16, 3)), 1.0, kernel_size=4)


# ----------------------------------------------------------------------------- the MoCo v2 recipe

ALL_OFF = dict(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)


def changed_images(images_uint8, out, atol=1e-4):
    """Boolean per image: did the augmentation change it?"""
    reference = np.asarray(augment.normalize(jnp.asarray(images_uint8)))
    return np.abs(np.asarray(out) - reference).max(axis=(1, 2, 3)) > atol


def test_output_shape_dtype_finite_and_in_normalised_range():
    images = random_uint8_images(8, batch=8)
    out = augment_jit(jax.random.key(0), jnp.asarray(images))
    assert out.shape == images.shape and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    unit = unnormalize(out)
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5


def test_all_probabilities_zero_is_plain_normalisation():
    images = random_uint8_images(9, batch=8)
    out = augment_jit(jax.random.key(1), jnp.asarray(images), **ALL_OFF)
    np.testing.assert_allclose(out, augment.normalize(jnp.asarray(images)), atol=1e-6)


@pytest.mark.parametrize("stage", ["jitter_prob", "grayscale_prob", "blur_prob"])
def test_probability_one_changes_every_image(stage):
    images = random_uint8_images(10, batch=8)
    out = augment_jit(jax.random.key(2), jnp.asarray(images), **{**ALL_OFF, stage: 1.0})
    assert changed_images(images, out).all()
    if stage == "grayscale_prob":
        unit = unnormalize(out)
        np.testing.assert_allclose(unit[..., 0], unit[..., 2], atol=1e-5)


def test_sampled_probabilities_and_ranges_match_the_recipe():
    sample = jax.jit(jax.vmap(lambda key: augment.sample_photometric_params(
        key, jitter_prob=0.8, brightness=0.4, contrast=0.3, saturation=0.2, hue=0.1,
        grayscale_prob=0.2, blur_prob=0.5, blur_sigma=(0.1, 2.0))))
    params = jax.tree.map(np.asarray, sample(jax.random.split(jax.random.key(3), 4000)))
    for flag, prob in (("apply_jitter", 0.8), ("apply_grayscale", 0.2), ("apply_blur", 0.5)):
        assert abs(getattr(params, flag).mean() - prob) < 0.03, flag
    for field, low, high in (("brightness_factor", 0.6, 1.4), ("contrast_factor", 0.7, 1.3),
                             ("saturation_factor", 0.8, 1.2), ("hue_shift", -0.1, 0.1),
                             ("blur_sigma", 0.1, 2.0)):
        values = getattr(params, field)
        assert low <= values.min() < low + 0.01 and high - 0.01 < values.max() <= high, field
    # Independent draws: the stage flags are uncorrelated across images.
    assert abs(np.corrcoef(params.apply_jitter, params.apply_blur)[0, 1]) < 0.05


def test_same_rng_is_identical_and_different_rng_differs():
    images = jnp.asarray(random_uint8_images(12, batch=8))
    first = np.asarray(augment_jit(jax.random.key(5), images))
    np.testing.assert_array_equal(first, np.asarray(augment_jit(jax.random.key(5), images)))
    assert np.abs(first - np.asarray(augment_jit(jax.random.key(6), images))).max() > 1e-2


def test_batch_equals_each_image_augmented_alone_with_its_key():
    images = random_uint8_images(13, batch=8)
    rng = jax.random.key(7)
    joint = np.asarray(augment_jit(rng, jnp.asarray(images)))
    assert changed_images(images, joint).sum() >= 4  # the default recipe did something
    augment_alone = jax.jit(augment.augment_one_image)
    for key, image, joint_image in zip(jax.random.split(rng, len(images)), images, joint):
        alone = augment.normalize_unit_interval(augment_alone(key, as_unit(image)))
        np.testing.assert_allclose(joint_image, alone, atol=1e-5)


def test_result_does_not_depend_on_sharding(tmp_path):
    """The batch sharded over 4 fake CPU devices (a subprocess, so XLA_FLAGS applies before JAX starts)
    gives the same views as the unsharded batch computed here."""
    images = random_uint8_images(14, batch=8)
    np.save(tmp_path / "images.npy", images)
    script = textwrap.dedent(f"""
        import numpy as np, jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from fgpair_jax.data.augment import mocov2_photometric
        assert jax.device_count() == 4, jax.devices()
        sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
        images = jax.device_put(np.load("{tmp_path}/images.npy"), sharding)
        out = jax.jit(mocov2_photometric)(jax.random.key(0), images)
        assert len(out.sharding.device_set) == 4
        np.save("{tmp_path}/sharded.npy", np.asarray(out))
    """)
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    unsharded = np.asarray(augment_jit(jax.random.key(0), jnp.asarray(images)))
    np.testing.assert_allclose(np.load(tmp_path / "sharded.npy"), unsharded, atol=1e-5)


@pytest.mark.parametrize("images, kwargs, message", [
    (np.zeros((2, 8, 8, 3), np.float32), {}, "expected uint8 images"),
    (np.zeros((8, 8, 3), np.uint8), {}, r"shaped \[batch, height, width, 3\]"),
    (np.zeros((2, 8, 8, 3), np.uint8), {"blur_prob": 1.5}, "blur_prob=1.5 is not a probability"),
    (np.zeros((2, 8, 8, 3), np.uint8), {"blur_sigma": (2.0, 0.1)}, "must satisfy 0 < low <= high"),
])
def test_bad_input_gives_clear_one_line_error(images, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        augment.mocov2_photometric(jax.random.key(0), jnp.asarray(images), **kwargs)
    assert "\n" not in str(info.value)
