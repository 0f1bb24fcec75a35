"""MoCo v2 photometric augmentation, run on the accelerator inside the jitted train step.

Why on device: colour jitter, grayscale and blur are per-pixel float work that would dominate a
2-core host pipeline; on the accelerator they are a few fused elementwise kernels. The host keeps the
geometric part (random-resized crop, flip) and ships uint8 views, which also quarters the transfer.
Flip commutes with everything here (the blur kernel is symmetric and its padding reflects), so doing
it on the host before these ops gives the same distribution as MoCo v2's torchvision order.

MoCo v2 recipe (per image, independent randomness):
  1. with probability 0.8: ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1);
  2. with probability 0.2: grayscale (ITU-R 601-2 luma, replicated to 3 channels);
  3. with probability 0.5: Gaussian blur, sigma ~ U[0.1, 2.0], kernel ~10% of the side (odd);
  4. normalise with the ImageNet mean and std.

Our reading of torchvision's semantics (images as float in [0, 1], clipped after every op):
  brightness  x * f,                            f ~ U[1 - b, 1 + b]
  contrast    f * x + (1 - f) * mean(gray(x)),  f ~ U[1 - c, 1 + c]  (one scalar mean per image)
  saturation  f * x + (1 - f) * gray(x),        f ~ U[1 - s, 1 + s]
  hue         HSV hue + d (mod 1),              d ~ U[-h, h]
ColorJitter order is FIXED here (brightness, contrast, saturation, hue) where torchvision draws a
random permutation per image. Why it costs little: brightness, contrast and saturation are linear
blends that commute exactly apart from clipping (gray() is linear with weights summing to 1), so only
where hue falls in the order differs; and under vmap a per-image order would turn every op into a
4-way select, i.e. ~4x the work of the most expensive stage.

Randomness: one key per image from `jax.random.split(rng, batch)`, consumed under `vmap` by a single
`uniform` draw of all that image's parameters (`sample_photometric_params`). Each image's draws
depend only on its own key, so results do not depend on how the batch is sharded over devices (and
`mocov2_photometric` on a batch equals `augment_one_image` on each image with its key).
"""
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ITU-R 601-2 luma weights, the ones PIL's convert("L") and torchvision's rgb_to_grayscale use.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


# ----------------------------------------------------------------------------- input checks


def _check_uint8_images(images: jax.Array, caller: str) -> None:
    """One-line errors for the two mistakes that matter: wrong dtype (double normalising) and layout."""
    if images.dtype != jnp.uint8:
        raise ValueError(
            f"{caller}: expected uint8 images in [0, 255], got dtype {images.dtype}; "
            "pass the host pipeline's uint8 views, not already-normalised floats."
        )
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"{caller}: expected images shaped [batch, height, width, 3], got {tuple(images.shape)}; "
            "use NHWC RGB layout."
        )


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"mocov2_photometric: {name}={value} is not a probability; use a value in [0, 1].")


# ----------------------------------------------------------------------------- normalisation


def normalize_unit_interval(images: jax.Array, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
    """Float images in [0, 1] (..., 3) -> (x - mean) / std, float32 (ImageNet statistics by default;
    encoders trained with other input scaling pass theirs, see `models.input_normalization`)."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std


def normalize(images_uint8: jax.Array, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
    """uint8 [B, H, W, 3] in [0, 255] -> float32 (x / 255 - mean) / std; the evaluation transform."""
    _check_uint8_images(images_uint8, "normalize")
    return normalize_unit_interval(images_uint8.astype(jnp.float32) / 255.0, mean, std)


# ----------------------------------------------------------------------------- colour building blocks
# Each takes one float image [H, W, 3] in [0, 1] (or a batch: they broadcast over leading axes, except
# adjust_contrast whose mean is over the last three axes) and returns the same shape, clipped to [0, 1].


def to_grayscale(image: jax.Array) -> jax.Array:
    """Luma (ITU-R 601-2) replicated to 3 channels, so it can replace the RGB image."""
    luma = jnp.tensordot(image, jnp.asarray(LUMA_WEIGHTS, image.dtype), axes=([-1], [0]))
    return jnp.repeat(luma[..., None], 3, axis=-1)


def _blend(image: jax.Array, other: jax.Array, factor) -> jax.Array:
    """factor * image + (1 - factor) * other, clipped; factor 1 is the identity, 0 gives `other`."""
    return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image: jax.Array, factor) -> jax.Array:
    """Scale intensities by `factor` (blend with black)."""
    return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image: jax.Array, factor) -> jax.Array:
    """Blend with the image's mean luma (a single grey level per image)."""
    mean_luma = jnp.mean(to_grayscale(image)[..., 0], axis=(-2, -1), keepdims=True)[..., None]
    return _blend(image, mean_luma, factor)


def adjust_saturation(image: jax.Array, factor) -> jax.Array:
    """Blend with the grayscale image; 0 gives gray, >1 over-saturates."""
    return _blend(image, to_grayscale(image), factor)


def rgb_to_hsv(image: jax.Array) -> jax.Array:
    """RGB in [0, 1] -> HSV with hue in [0, 1) (colorsys convention); grey pixels get hue 0, sat 0."""
    red, green, blue = image[..., 0], image[..., 1], image[..., 2]
    value = jnp.max(image, axis=-1)
    chroma = value - jnp.min(image, axis=-1)
    is_grey = chroma == 0
    saturation = jnp.where(is_grey, 0.0, chroma / jnp.where(value == 0, 1.0, value))
    safe_chroma = jnp.where(is_grey, 1.0, chroma)
    # Hue sector offset by which channel is the maximum (ties resolved red > green > blue).
    hue_if_red_max = (green - blue) / safe_chroma
    hue_if_green_max = 2.0 + (blue - red) / safe_chroma
    hue_if_blue_max = 4.0 + (red - green) / safe_chroma
    hue_sixths = jnp.where(
        value == red, hue_if_red_max, jnp.where(value == green, hue_if_green_max, hue_if_blue_max)
    )
    hue = jnp.where(is_grey, 0.0, jnp.mod(hue_sixths / 6.0, 1.0))
    return jnp.stack([hue, saturation, value], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """Inverse of `rgb_to_hsv` (hue taken mod 1), in the branch-free closed form.

    Channel n in (R, G, B) = (5, 3, 1): v - v * s * clip(min(k, 4 - k), 0, 1), k = (n + 6 * hue) mod 6.
    Equivalent to the six-sector table, but a handful of fused elementwise ops instead of selects.
    """
    hue, saturation, value = hsv[..., :1], hsv[..., 1:2], hsv[..., 2:3]
    channel_offsets = jnp.asarray([5.0, 3.0, 1.0], hsv.dtype)
    sector_position = jnp.mod(channel_offsets + 6.0 * hue, 6.0)
    ramp = jnp.clip(jnp.minimum(sector_position, 4.0 - sector_position), 0.0, 1.0)
    return jnp.clip(value - value * saturation * ramp, 0.0, 1.0)


def adjust_hue(image: jax.Array, shift) -> jax.Array:
    """Rotate the HSV hue by `shift` turns (shift in [-0.5, 0.5]); saturation and value unchanged."""
    hsv = rgb_to_hsv(image)
    rotated = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + shift, 1.0))
    return hsv_to_rgb(rotated)


# ----------------------------------------------------------------------------- blur


def blur_kernel_size(side: int) -> int:
    """Kernel width ~10% of the image side, odd, at least 3 (23 for 224 px as in MoCo v2)."""
    width = max(3, int(0.1 * side))
    return width if width % 2 else width + 1


def gaussian_kernel_1d(sigma, width: int) -> jax.Array:
    """Normalised 1-D Gaussian taps at offsets -(width//2)..width//2; `sigma` may be traced."""
    offsets = jnp.arange(width, dtype=jnp.float32) - (width // 2)
    taps = jnp.exp(-0.5 * jnp.square(offsets / sigma))
    return taps / jnp.sum(taps)


def _blur_along_axis(image: jax.Array, taps: jax.Array, axis: int) -> jax.Array:
    """Correlate with `taps` along `axis` using reflect padding (no edge repeat, like torch "reflect").

    A sum of shifted slices rather than lax.conv: the taps differ per image under vmap, and shifted
    slices fuse into one elementwise kernel on every backend without a grouped-convolution fallback.
    """
    width = taps.shape[0]
    half = width // 2
    pad = [(0, 0)] * image.ndim
    pad[axis] = (half, half)
    padded = jnp.pad(image, pad, mode="reflect")
    length = image.shape[axis]
    out = jnp.zeros_like(image)
    for tap in range(width):
        out = out + taps[tap] * jax.lax.slice_in_dim(padded, tap, tap + length, axis=axis)
    return out


def gaussian_blur(image: jax.Array, sigma, kernel_size: int = 0) -> jax.Array:
    """Separable Gaussian blur of one image [H, W, C]; kernel_size 0 = `blur_kernel_size(min(H, W))`."""
    width = kernel_size or blur_kernel_size(min(image.shape[0], image.shape[1]))
    if width % 2 == 0 or width // 2 >= min(image.shape[0], image.shape[1]):
        raise ValueError(
            f"gaussian_blur: kernel_size={width} must be odd and its half-width smaller than the image "
            f"side {min(image.shape[0], image.shape[1])}; pick an odd size below twice the side."
        )
    taps = gaussian_kernel_1d(sigma, width)
    return _blur_along_axis(_blur_along_axis(image, taps, axis=0), taps, axis=1)


# ----------------------------------------------------------------------------- the MoCo v2 recipe


class PhotometricParams(NamedTuple):
    """One image's random draws; sampled apart from their use so each op stays a pure function."""

    apply_jitter: jax.Array
    brightness_factor: jax.Array
    contrast_factor: jax.Array
    saturation_factor: jax.Array
    hue_shift: jax.Array
    apply_grayscale: jax.Array
    apply_blur: jax.Array
    blur_sigma: jax.Array


def sample_photometric_params(key: jax.Array, *, jitter_prob: float, brightness: float,
                              contrast: float, saturation: float, hue: float,
                              grayscale_prob: float, blur_prob: float,
                              blur_sigma: Tuple[float, float]) -> PhotometricParams:
    """All of one image's draws from a single uniform vector (one RNG call: cheap to compile)."""
    fields = PhotometricParams._fields
    uniform = dict(zip(fields, jax.random.uniform(key, (len(fields),), jnp.float32)))

    def in_range(field, low, high):
        return low + (high - low) * uniform[field]

    return PhotometricParams(
        apply_jitter=uniform["apply_jitter"] < jitter_prob,
        brightness_factor=in_range("brightness_factor", max(0.0, 1.0 - brightness), 1.0 + brightness),
        contrast_factor=in_range("contrast_factor", max(0.0, 1.0 - contrast), 1.0 + contrast),
        saturation_factor=in_range("saturation_factor", max(0.0, 1.0 - saturation), 1.0 + saturation),
        hue_shift=in_range("hue_shift", -hue, hue),
        apply_grayscale=uniform["apply_grayscale"] < grayscale_prob,
        apply_blur=uniform["apply_blur"] < blur_prob,
        blur_sigma=in_range("blur_sigma", blur_sigma[0], blur_sigma[1]),
    )


def color_jitter(image: jax.Array, params: PhotometricParams, with_hue: bool = True) -> jax.Array:
    """torchvision ColorJitter with drawn factors, fixed op order (see module docstring for why)."""
    image = adjust_brightness(image, params.brightness_factor)
    image = adjust_contrast(image, params.contrast_factor)
    image = adjust_saturation(image, params.saturation_factor)
    if with_hue:  # static: skip the HSV round trip entirely when hue jitter is off
        image = adjust_hue(image, params.hue_shift)
    return image


def augment_one_image(key: jax.Array, image: jax.Array, *, jitter_prob: float = 0.8,
                      brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                      hue: float = 0.1, grayscale_prob: float = 0.2, blur_prob: float = 0.5,
                      blur_sigma: Tuple[float, float] = (0.1, 2.0)) -> jax.Array:
    """One float image [H, W, 3] in [0, 1] -> augmented, still in [0, 1] (not normalised).

    Skipped ops are selected away with `where` (exact identity), not `cond`: under vmap `cond`
    becomes a select of both branches anyway, and `where` keeps the per-image path branch-free.
    """
    params = sample_photometric_params(
        key, jitter_prob=jitter_prob, brightness=brightness, contrast=contrast,
        saturation=saturation, hue=hue, grayscale_prob=grayscale_prob, blur_prob=blur_prob,
        blur_sigma=blur_sigma)
    image = jnp.where(params.apply_jitter, color_jitter(image, params, with_hue=hue > 0), image)
    image = jnp.where(params.apply_grayscale, to_grayscale(image), image)
    return jnp.where(params.apply_blur, gaussian_blur(image, params.blur_sigma), image)


def mocov2_photometric(rng: jax.Array, images_uint8: jax.Array, *, jitter_prob: float = 0.8,
                       brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                       hue: float = 0.1, grayscale_prob: float = 0.2, blur_prob: float = 0.5,
                       blur_sigma: Tuple[float, float] = (0.1, 2.0), mean=IMAGENET_MEAN,
                       std=IMAGENET_STD) -> jax.Array:
    """uint8 views [B, H, W, 3] -> MoCo v2 photometric augmentation -> (x - mean) / std float32.

    Image i uses key `jax.random.split(rng, B)[i]`; jit-able, deterministic given `rng`, and
    independent of how the batch is sharded. The keyword knobs are static Python floats: call it inside
    the jitted step with config values, or list them in `static_argnames` when jitting it directly.
    """
    _check_uint8_images(images_uint8, "mocov2_photometric")
    for name, value in (("jitter_prob", jitter_prob), ("grayscale_prob", grayscale_prob),
                        ("blur_prob", blur_prob)):
        _check_probability(name, value)
    if min(brightness, contrast, saturation) < 0 or not 0.0 <= hue <= 0.5:
        raise ValueError(
            "mocov2_photometric: brightness/contrast/saturation must be >= 0 and hue in [0, 0.5]; "
            f"got {brightness}, {contrast}, {saturation}, {hue}."
        )
    if not 0.0 < blur_sigma[0] <= blur_sigma[1]:
        raise ValueError(f"mocov2_photometric: blur_sigma={blur_sigma} must satisfy 0 < low <= high.")
    augment = lambda key, image: augment_one_image(  # noqa: E731
        key, image, jitter_prob=jitter_prob, brightness=brightness, contrast=contrast,
        saturation=saturation, hue=hue, grayscale_prob=grayscale_prob, blur_prob=blur_prob,
        blur_sigma=blur_sigma)
    keys = jax.random.split(rng, images_uint8.shape[0])
    augmented = jax.vmap(augment)(keys, images_uint8.astype(jnp.float32) / 255.0)
    return normalize_unit_interval(augmented, mean, std)
