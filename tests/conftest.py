"""Shared test fixtures: a tiny config, a tiny CUB-layout folder, the shared subset's location.

Also JAX's persistent compilation cache for the whole test session: compiling dominates the suite's time
on CPU, and many tests (and the processes they start: the CLI, the kill harness, fake-device runs)
compile the same programs. Every program is still compiled once per clean checkout (CI starts empty);
`FGPAIR_TEST_COMPILATION_CACHE=none` turns the cache off, another path moves it.
"""
import os

import pytest

from configs import cub
from fgpair_jax import compilation_cache, run_config
from fgpair_jax.data.synthetic import write_tiny_cub  # noqa: F401  (tests import it from here)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CUB = cub.DEFAULT_CUB_DIR


def use_compilation_cache() -> None:
    """Share compiled programs between tests, xdist workers and subprocesses (which inherit the env), in a
    cache of the tests' own: a run's default (`compilation_cache_dir="auto"`) takes $JAX_COMPILATION_CACHE_DIR
    before the user's ~/.cache/fgpair_jax/jax, and with the cache off JAX's own switch keeps it off there too.
    Processes that do not go through `compilation_cache.enable` get the same size limit from the env."""
    default = os.path.join(REPO, ".pytest_cache", "jax_compilation_cache")
    directory = os.environ.setdefault("FGPAIR_TEST_COMPILATION_CACHE", default)
    if directory == "none":
        os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
        compilation_cache.enable("none")
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(compilation_cache.MAX_SIZE_BYTES)  # LRU-evicted beyond
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(compilation_cache.MIN_COMPILE_TIME_SECS)
    compilation_cache.enable(directory)


use_compilation_cache()


def tiny_config(**overrides):
    """`configs/cub.py:tiny` (8-channel ResNet, 32 px, batch 8, one epoch) with dotted-key overrides."""
    return run_config.override(cub.get_config("tiny"), overrides)


@pytest.fixture
def tiny_cub(tmp_path):
    return write_tiny_cub(str(tmp_path / "CUB_200_2011"))


def requires_shared_cub():
    """Skip (not fail) when the shared CUB subset is not beside the repository."""
    if not os.path.isdir(os.path.join(SHARED_CUB, "images")):
        pytest.skip(f"shared CUB subset not found at {SHARED_CUB}")
    return SHARED_CUB


@pytest.fixture(autouse=True, scope="session")
def shared_tfds_data_dir(tmp_path_factory):
    """Builds made without an explicit data_dir go to one folder per test session (and to the processes the
    tests start), never to the user's ~/tensorflow_datasets, the default a real run shares its builds in."""
    previous = os.environ.get("TFDS_DATA_DIR")
    os.environ["TFDS_DATA_DIR"] = str(tmp_path_factory.mktemp("tfds_data_dir"))
    yield os.environ["TFDS_DATA_DIR"]
    if previous is None:
        os.environ.pop("TFDS_DATA_DIR", None)
    else:
        os.environ["TFDS_DATA_DIR"] = previous
