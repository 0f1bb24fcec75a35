"""What a data set's reader produces, and all the shared builder (`builder.py`) needs from it.

A reader knows one data set's official layout (its index files, its label set, its splits and boxes) and
nothing of TFDS, image decoding or storage: it returns a `DataIndex`, a list of `ImageRecord`s plus the
label names. Everything else (finding the files, image checks and conversion, skip reasons, the pixel
limit, the build lock, the build's key) is written once, in `builder.py` and `images.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

SPLITS = ("train", "test")

# (x_min, y_min, x_max, y_max) in pixels of the original image, 0-based edges: the box covers the pixel
# columns x_min <= x < x_max. Readers convert their data set's convention (CUB: x, y, width, height;
# Cars and Aircraft: 1-based inclusive corners) to this one and say how in their docstring.
Box = tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One listed image.

    image_id: unique within the data set; the data set's own id where it has one (CUB's images.txt id),
      else the position in the reader's sorted listing.
    file_name: as the index names it, '/'-separated, relative to `DataIndex.images_dir` (kept in the build).
    label: 0..C-1, an index into `DataIndex.class_names`.
    split: "train" or "test".
    box: the object's bounding box (`Box`), or None where the data set has none.
    """

    image_id: int
    file_name: str
    label: int
    split: str
    box: Box | None = None


@dataclasses.dataclass(frozen=True)
class DataIndex:
    """A data set's listed images and label set, as its reader read them from `manual_dir`.

    data_set: its name for messages, e.g. "CUB folder", "Stanford Cars folder".
    images_dir: the folder every `ImageRecord.file_name` is relative to.
    class_names: label -> the data set's own class name, verbatim ("Ram C/V Cargo Van Minivan 2012", "F/A-18").
    class_ids: label -> the data set's own class id (CUB and Cars: their 1-based ids; others: position in the
      official class list).
    listed_in: where the file names come from, for messages ("images.txt", "devkit/cars_train_annos.mat").
    expected_layout: one sentence naming the layout and the config key, appended to every layout error.
    """

    data_set: str
    manual_dir: str
    images_dir: str
    records: tuple[ImageRecord, ...]
    class_names: tuple[str, ...]
    class_ids: tuple[int, ...]
    listed_in: str
    expected_layout: str

    @property
    def has_boxes(self) -> bool:
        return any(record.box is not None for record in self.records)


@dataclasses.dataclass(frozen=True)
class Download:
    """Where a data set's official archive can still be fetched, and the checksum the project pins.

    md5: the data set's published MD5 of the archive (the source is named in `checksum_source`).
    """

    url: str
    file_name: str
    md5: str
    checksum_source: str


@dataclasses.dataclass(frozen=True)
class DataSet:
    """One registered data set (`sources.DATA_SETS`): `config.data.name` picks it.

    read_index: (manual_dir, data_config) -> DataIndex; `data_config` is `config.data`, for the data set's
      own knobs (e.g. `aircraft_train_split`). Raises `DataError`/`MissingFileError` (one line, ending with
      `expected_layout`) for a folder it cannot read.
    marker: a path relative to the data set's root folder that only that folder holds (e.g. "images.txt"):
      finds the root inside an extracted archive.
    download: the official archive, or None where there is no live official address.
    manual_download: one sentence on where to get the files and where to put them.
    official_files: the names of the official archives (and loose files) a folder of downloads holds: only
      these are extracted and keyed when `manual_dir` is such a folder (a ~/Downloads beside them); () for
      any archive in the folder (a class-per-folder set has no official names).
    """

    name: str
    read_index: Callable
    expected_layout: str
    marker: str
    manual_download: str
    download: Download | None = None
    official_files: tuple[str, ...] = ()
