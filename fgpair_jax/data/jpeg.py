"""Stored JPEGs decoded when read, at reduced size when the crops allow (`config.data.reduced_decode`).

Why: libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size by scaling in the DCT domain (PIL's
`Image.draft`, OpenCV's IMREAD_REDUCED_*), for a fraction of a full decode's work. A training view is a
random crop resized to `image_size`; when both crops of an image keep at least `image_size` pixels on each
side at the reduced size, decoding reduced and resizing less gives the same view up to resampling
(`reduction_for`). With images much larger than the training size (FGVC-Aircraft at 224 px; CUB at 112 px)
most images qualify; at 224 px CUB's ~500x375 images never do (375 / 2 < 224).

A record of such a source carries an `EncodedImage` (the JPEG's bytes and the region of it the record
stands for) instead of decoded pixels. It has the `shape` of the pixels it stands for and narrows under 2-D
slicing, so read-time crops (`crops.py`) apply unchanged; `np.asarray` decodes it in full, with exactly the
pixels the decoded source gives (libjpeg-turbo's default decode, EXIF orientation ignored, as PIL and TFDS).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from fgpair_jax.data import resize

REDUCTIONS = (8, 4, 2, 1)  # libjpeg's DCT scalings, largest first


@functools.lru_cache(maxsize=None)
def _read_flag(reduction: int) -> int:
    """OpenCV's imdecode flag for a colour decode at 1/`reduction`, ignoring EXIF orientation (as PIL)."""
    cv2 = resize.opencv()
    colour = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
              8: cv2.IMREAD_REDUCED_COLOR_8}[reduction]
    return colour | cv2.IMREAD_IGNORE_ORIENTATION


def decode(data: bytes, reduction: int = 1) -> np.ndarray:
    """The RGB JPEG `data` decoded to uint8 [ceil(H/r), ceil(W/r), 3] at 1/`reduction` (1, 2, 4 or 8).

    Raises ValueError for bytes OpenCV cannot decode (builds store only images that decode: `images.py`).
    """
    cv2 = resize.opencv()
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), _read_flag(reduction))
    if bgr is None:
        raise ValueError(f"could not decode {len(data)} bytes as a JPEG (reduction {reduction})")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def reduction_for(boxes: Sequence[tuple[float, float, float, float]], size: int) -> int:
    """The largest of `REDUCTIONS` at which every box (top, left, height, width, in full-size pixels) still
    spans at least `size` pixels on each side: decoding smaller never enlarges a view that a full decode
    would have shrunk."""
    smallest_side = min(min(box[2], box[3]) for box in boxes)
    return next(r for r in REDUCTIONS if smallest_side / r >= size or r == 1)


class EncodedImage:
    """A JPEG's bytes and the region of it (top, left, height, width, in its pixels) a record stands for.

    `shape` is the region's (height, width, 3); `image[top:bottom, left:right]` narrows the region as it
    would crop an array (steps other than 1 are refused); `np.asarray(image)` decodes it.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, data: bytes, region: tuple[int, int, int, int] | None = None,
                 full_size: tuple[int, int] | None = None):
        self.data = data
        if full_size is None:
            with Image.open(io.BytesIO(data)) as header:  # reads the header only
                full_size = (header.height, header.width)
        self.full_size = full_size  # (height, width) of the whole JPEG
        self.region = region if region is not None else (0, 0, *full_size)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.region[2], self.region[3], 3)

    def __getitem__(self, key) -> EncodedImage:
        keys = key if isinstance(key, tuple) else (key,)
        if len(keys) > 2 or not all(isinstance(k, slice) and k.step in (None, 1) for k in keys):
            raise TypeError(f"an EncodedImage narrows under row/column slices only, not {key!r}; "
                            "decode it first (np.asarray)")
        top, left, height, width = self.region
        rows, columns = (*keys, slice(None), slice(None))[:2]
        row_start, row_stop, _ = rows.indices(height)
        col_start, col_stop, _ = columns.indices(width)
        region = (top + row_start, left + col_start, max(0, row_stop - row_start), max(0, col_stop - col_start))
        return EncodedImage(self.data, region, self.full_size)

    def decode_region(self, reduction: int = 1) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        """(the whole JPEG decoded at 1/`reduction`, the region in its pixels: float top, left, height,
        width; the decoded size is rounded up, so the scale is taken per axis from it)."""
        pixels = decode(self.data, reduction)
        scale_y, scale_x = pixels.shape[0] / self.full_size[0], pixels.shape[1] / self.full_size[1]
        top, left, height, width = self.region
        return pixels, (top * scale_y, left * scale_x, height * scale_y, width * scale_x)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        del copy  # always a new array
        top, left, height, width = self.region
        pixels = decode(self.data)[top : top + height, left : left + width]
        return pixels if dtype is None else pixels.astype(dtype)

    def __repr__(self) -> str:
        return f"EncodedImage({len(self.data)} bytes, full {self.full_size}, region {self.region})"


class EncodedRecords(Sequence):
    """The records of a random-access source read without decoding the image, each `image` made an
    `EncodedImage` (a random-access source itself, for grain)."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, position: int) -> dict:
        record = dict(self.source[position])
        record["image"] = EncodedImage(record["image"])
        return record
