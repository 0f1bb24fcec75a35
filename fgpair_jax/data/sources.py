"""Which data set `config.data.name` means, where its build lives, and the sources a run reads.

Add a data set: one reader module (a `records.DataSet` with its `read_index`; see `cub.py`,
`image_folder.py`) and one entry in `DATA_SETS`. The shared builder (`builder.py`) does the rest.
"""
import logging
import os

from fgpair_jax.data import aircraft, archives, cars, crops, cub, decoded_cache, image_folder, splits
from fgpair_jax.errors import ConfigError, MissingFileError

DATA_SETS = {data_set.name: data_set for data_set in (cub.DATA_SET, cars.DATA_SET, aircraft.DATA_SET,
                                                         image_folder.DATA_SET)}
# TFDS's own default (tensorflow_datasets.core.constants.DATA_DIR), named here so that importing this
# module does not import TFDS.
TFDS_DEFAULT_DATA_DIR = os.path.join("~", "tensorflow_datasets")


def resolve_data_dir(config, workdir: str = "") -> str:
    """`config.data.data_dir`, else $TFDS_DATA_DIR, else TFDS's default `~/tensorflow_datasets`: one build
    serves every run (TFDS's convention). `workdir` is unused (runs once kept a copy each in <workdir>/tfds)."""
    del workdir
    chosen = config.data.data_dir or os.environ.get("TFDS_DATA_DIR", "") or TFDS_DEFAULT_DATA_DIR
    return os.path.abspath(os.path.expanduser(chosen))


def check_name(name: str) -> None:
    """`ConfigError` naming the registered data sets when `config.data.name` is not one of them."""
    if name not in DATA_SETS:
        raise ConfigError(f"Unknown config.data.name={name!r}; choose one of {sorted(DATA_SETS)}.")


def check_crops(data_config, has_boxes: bool) -> None:
    """`ConfigError` for box crops on a build without boxes (the banner is checked with the config:
    `run_config.validate`)."""
    if data_config.crop_to_box and not has_boxes:
        raise ConfigError(f"config.data.crop_to_box=True, but this {data_config.name!r} folder has no bounding boxes "
                          f"(CUB's bounding_boxes.txt, Cars' and Aircraft's annotations); set it to False.")


def check_manual_dir(data_set, manual_dir: str, download: bool) -> None:
    """One-line `MissingFileError` for a `manual_dir` that does not exist when no download was asked for,
    naming the layout, and for a data set with an official address the download knob."""
    if download and manual_dir and os.path.exists(manual_dir):
        logging.warning("config.data.download=True is ignored: config.data.manual_dir=%r exists and is read "
                        "instead (set --config.data.manual_dir= to download).", manual_dir)
    if download or (manual_dir and os.path.exists(manual_dir)):
        return
    fetch = (f" (or set config.data.download=True to fetch {data_set.download.file_name} once from "
             f"{data_set.download.url})" if data_set.download else f" ({data_set.manual_download})")
    raise MissingFileError(f"config.data.manual_dir={manual_dir!r} does not exist; {data_set.expected_layout}{fetch}.")


def build_line(info) -> str:
    """The run's line saying which build it reads: 'Data: cub (100 classes, 2,999 train / 2,903 eval images),
    build <dir> (reused)'. Sizes are the splits the run reads (with eval_split=val, train minus val / val)."""
    sizes = info.split_sizes
    return (f"Data: {info.data_set} ({info.num_classes} classes, {sizes['train']:,} train / {sizes['test']:,} "
            f"eval images), build {info.builder_dir} ({'built now' if info.built_now else 'reused'})")


def load_sources(config, workdir: str = ""):
    """(split -> random-access source, info) for the configured data set, built on first use.

    `config.data.manual_dir` may be the extracted folder or the official archive(s) (`archives.py`; with
    `config.data.download`, fetched once where an official address remains). "train" is what SSL trains on
    and "test" is what evaluation scores: the test split, or with `config.data.eval_split = "val"` a held-out
    part of train (`splits.with_validation_as_eval`). Read-time crops (`crops.py`) apply to both.
    """
    from fgpair_jax.data import builder  # TFDS: imported only when data is loaded

    check_name(config.data.name)
    splits.check_eval_split(config.data.eval_split, config.data.val_fraction)
    data_set = DATA_SETS[config.data.name]
    data_dir = resolve_data_dir(config)
    check_manual_dir(data_set, config.data.manual_dir, config.data.download)
    manual_dir = archives.resolve_manual_dir(data_set, config.data.manual_dir, data_dir,
                                             download=config.data.download)
    sources, info = builder.load_sources(
        data_set, manual_dir, data_dir, max_image_pixels=config.data.max_image_pixels, data_config=config.data,
        check_index=lambda index: check_crops(config.data, index.has_boxes),  # before any image is decoded
        stored_short_side=config.data.stored_short_side, encoded_images=config.data.reduced_decode)
    chosen = []
    if config.data.aircraft_remove_banner:
        chosen.append(crops.without_bottom_rows(aircraft.BANNER_ROWS))
    if config.data.crop_to_box:
        chosen.append(crops.to_box)
    sources = crops.apply(sources, chosen)
    if config.data.eval_split == "val":
        sources, info = splits.with_validation_as_eval(sources, info, config.data.val_fraction)
    if config.data.cache_gib:
        sources = dict(sources, train=decoded_cache.decoded_cache(sources["train"], config.data.cache_gib))
    return sources, info
