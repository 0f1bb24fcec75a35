"""Which data set `config.data.name` means, and where its built TFDS copy lives.

Register another fine-grained data set (Stanford Cars, FGVC-Aircraft) by adding a loader with the
signature of `cub.load_cub_sources` (manual_dir, data_dir, *, max_image_pixels) to `LOADERS`.
"""
import os

from fgpair_jax.data import cub, splits
from fgpair_jax.errors import ConfigError

LOADERS = {"cub": cub.load_cub_sources}


def resolve_data_dir(config, workdir: str) -> str:
    """`config.data.data_dir`, else $TFDS_DATA_DIR, else `<workdir>/tfds` (built once, reused on resume)."""
    return config.data.data_dir or os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "")) or os.path.join(workdir, "tfds")


def check_name(name: str) -> None:
    """`ConfigError` naming the registered data sets when `config.data.name` is not one of them."""
    if name not in LOADERS:
        raise ConfigError(f"Unknown config.data.name={name!r}; choose one of {sorted(LOADERS)}.")


def load_sources(config, workdir: str):
    """(split -> random-access source, info) for the configured data set, built on first use.

    "train" is what SSL trains on and "test" is what evaluation scores: the test split, or with
    `config.data.eval_split = "val"` a held-out part of train (`splits.with_validation_as_eval`).
    """
    check_name(config.data.name)
    splits.check_eval_split(config.data.eval_split, config.data.val_fraction)
    sources, info = LOADERS[config.data.name](config.data.manual_dir, resolve_data_dir(config, workdir),
                                              max_image_pixels=config.data.max_image_pixels)
    if config.data.eval_split == "val":
        sources, info = splits.with_validation_as_eval(sources, info, config.data.val_fraction)
    return sources, info
