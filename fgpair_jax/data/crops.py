"""Read-time crops of a built data set: to the object's bounding box (`config.data.crop_to_box`), or without
FGVC-Aircraft's copyright banner (`config.data.aircraft_remove_banner`).

Both happen when a record is read, not when the data set is built, so one build serves every choice. Many
fine-grained papers report full images and box crops; full images are the default, as in LCR.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


class Cropped(Sequence):
    """The records of a random-access `source` with `crop` applied to each (itself a random-access source)."""

    def __init__(self, source, crop: Callable[[dict], dict]):
        self.source, self.crop = source, crop

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, position: int) -> dict:
        return self.crop(dict(self.source[position]))


def to_box(record: dict) -> dict:
    """`record` with its image cut to its box (pixel edges rounded outwards, at least one pixel) and the box
    made the whole new image. Records of data sets without boxes carry the whole image as their box."""
    image = record["image"]
    height, width = image.shape[:2]
    x_min, y_min, x_max, y_max = (float(v) for v in record["box"])
    left, top = int(np.clip(np.floor(x_min), 0, width - 1)), int(np.clip(np.floor(y_min), 0, height - 1))
    right, bottom = int(np.clip(np.ceil(x_max), left + 1, width)), int(np.clip(np.ceil(y_max), top + 1, height))
    record["image"] = image[top:bottom, left:right]
    record["box"] = np.array([0, 0, right - left, bottom - top], np.float32)
    return record


def without_bottom_rows(rows: int) -> Callable[[dict], dict]:
    """A crop that drops the image's bottom `rows` pixel rows (at least one row is kept) and clips the box to
    what is left: FGVC-Aircraft's 20-pixel copyright banner (`aircraft.BANNER_ROWS`)."""

    def crop(record: dict) -> dict:
        image = record["image"]
        kept = max(1, image.shape[0] - rows)
        record["image"] = image[:kept]
        box = np.asarray(record["box"], np.float32).copy()
        box[[1, 3]] = np.clip(box[[1, 3]], 0, kept)
        record["box"] = box
        return record

    return crop


def apply(sources: dict, crops: Sequence[Callable[[dict], dict]]) -> dict:
    """Every split of `sources` with `crops` applied in order (unchanged for none)."""
    if not crops:
        return sources

    def all_of(record: dict) -> dict:
        for crop in crops:
            record = crop(record)
        return record

    return {split: Cropped(source, all_of) for split, source in sources.items()}
