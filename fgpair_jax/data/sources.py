"""Which data set `config.data.name` means, and where its built TFDS copy lives.

Register another fine-grained data set (Stanford Cars, FGVC-Aircraft) by adding a loader with the
signature of `cub.load_cub_sources` to `LOADERS`.
"""
import os

from fgpair_jax.data import cub

LOADERS = {"cub": cub.load_cub_sources}


def resolve_data_dir(config, workdir: str) -> str:
    """`config.data.data_dir`, else $TFDS_DATA_DIR, else `<workdir>/tfds` (built once, reused on resume)."""
    return config.data.data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join(workdir, "tfds")


def load_sources(config, workdir: str):
    """(split -> random-access source, info) for the configured data set, built on first use."""
    if config.data.name not in LOADERS:
        raise ValueError(f"Unknown config.data.name={config.data.name!r}; choose one of {sorted(LOADERS)}.")
    return LOADERS[config.data.name](config.data.manual_dir, resolve_data_dir(config, workdir))
