"""Resampling one training view: a box of an image to size x size, by PIL or OpenCV (`config.data.view_resize`).

Why two: PIL's antialiased bilinear is torchvision's (the reference MoCo v2 pipeline's) but scalar code;
OpenCV's SIMD resize does the same box in about a sixth of the host time (benchmarks/pipeline_throughput.py),
which at 224 px is the largest part of the host's cost per image. They agree to within rounding when a
view is enlarged and to a few grey levels when it is shrunk (`view_opencv`). Light to import (PIL; cv2 on
first use): `run_config` checks the knob through this module.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from fgpair_jax.errors import ConfigError

RESIZERS = ("pil", "opencv")
PIL_RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
_OPENCV_INTERPOLATION = {"bilinear": "INTER_LINEAR", "bicubic": "INTER_CUBIC"}  # cv2's names, looked up on use


def check_view_resize(name: str) -> str:
    """`name` if it is one of `RESIZERS`, else a one-line `ConfigError` naming the key."""
    if name not in RESIZERS:
        raise ConfigError(f"config.data.view_resize={name!r}: use one of {', '.join(RESIZERS)}.")
    return name


def opencv():
    """cv2, limited to one thread on first use: one image is too small to split, and grain's threads and
    worker processes already use the cores (OpenCV's own pool would compete with them)."""
    import cv2  # pylint: disable=import-outside-toplevel  # only the opencv paths need it

    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)
    return cv2


def view_pil(image: Image.Image, box: tuple[float, float, float, float], size: int, flip: bool = False,
             interpolation: str = "bilinear") -> Image.Image:
    """The `box` (top, left, height, width; may be fractional) of `image` resized by PIL to size x size (one
    antialiased crop + resize), mirrored left-right when `flip`."""
    top, left, crop_height, crop_width = box
    view = image.resize((size, size), PIL_RESAMPLING[interpolation],
                        box=(left, top, left + crop_width, top + crop_height))
    return view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else view


def view_opencv(image: np.ndarray, box: tuple[float, float, float, float], size: int, flip: bool = False,
                interpolation: str = "bilinear") -> np.ndarray:
    """The `box` (top, left, height, width; edges rounded to whole pixels) of a uint8 [H,W,3] image resized
    by OpenCV to uint8 [size,size,3], mirrored left-right when `flip`.

    Enlarging uses OpenCV's bilinear (or bicubic) interpolation, PIL's pixel-centre convention: the views
    differ by rounding (about 0.2 grey levels on average on CUB). Shrinking on both axes uses its area
    average, antialiased like PIL's widened filter but a box instead of a triangle (1-2 grey levels on
    average). A box enlarged on one axis and shrunk on the other (by at most 4/3, the aspect range) is
    interpolated.
    """
    cv2 = opencv()
    top, left = int(round(box[0])), int(round(box[1]))
    bottom = min(image.shape[0], max(top + 1, int(round(box[0] + box[2]))))
    right = min(image.shape[1], max(left + 1, int(round(box[1] + box[3]))))
    crop = image[top:bottom, left:right]
    shrinks = crop.shape[0] >= size and crop.shape[1] >= size
    method = cv2.INTER_AREA if shrinks else getattr(cv2, _OPENCV_INTERPOLATION[interpolation])
    view = cv2.resize(crop, (size, size), interpolation=method)
    return cv2.flip(view, 1) if flip else view
