"""Shared test fixtures: a tiny config, a tiny CUB-layout folder, the shared subset's location.

Also JAX's persistent compilation cache for the whole test session: compiling dominates the suite's time
on CPU, and many tests (and the processes they start: the CLI, the kill harness, fake-device runs)
compile the same programs. Every program is still compiled once per clean checkout (CI starts empty);
`FGPAIR_TEST_COMPILATION_CACHE=none` turns the cache off, another path moves it.
"""
import os

import jax
import pytest

from configs import cub
from fgpair_jax import run_config
from fgpair_jax.data.synthetic import write_tiny_cub  # noqa: F401  (tests import it from here)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CUB = cub.DEFAULT_CUB_DIR


def use_compilation_cache() -> None:
    """Share compiled programs between tests, xdist workers and subprocesses (which inherit the env)."""
    default = os.path.join(REPO, ".pytest_cache", "jax_compilation_cache")
    directory = os.environ.setdefault("FGPAIR_TEST_COMPILATION_CACHE", default)
    if directory == "none":
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(2 * 2**30)  # LRU-evicted beyond 2 GiB
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_compilation_cache_max_size", 2 * 2**30)


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
