"""Shared test fixtures: a tiny config, a tiny CUB-layout folder, the shared subset's location.

Compiling dominates the suite's time on CPU, so the session (and every process a test starts, through the
environment) compiles fast:
- LLVM without optimisation (`XLA_FLAGS=--xla_backend_optimization_level=0`): XLA's HLO passes still run,
  only the machine code is less optimised, which the tests' tiny steps do not mind (compiles about
  halve: results/README.md, "Test suite"). Tests that start processes with XLA_FLAGS of their own add to `xla_flags()`, so both
  sides of an equality compile the same way. `FGPAIR_TEST_XLA_OPTIMIZATION=default` keeps LLVM's default.
- JAX's persistent compilation cache: many tests (and the processes they start: the CLI, the kill
  harness, fake-device runs) compile the same programs. Every program is still compiled once per clean
  checkout (CI starts empty); `FGPAIR_TEST_COMPILATION_CACHE=none` turns the cache off, another path moves it.
"""
import os

FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0"
if os.environ.get("FGPAIR_TEST_XLA_OPTIMIZATION", "fast") == "fast" and FAST_COMPILE_XLA_FLAGS not in \
        os.environ.get("XLA_FLAGS", ""):  # before JAX's CPU backend starts: it reads XLA_FLAGS once
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_XLA_FLAGS}".strip()

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


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes half a minute or more of the 2-core CPU; collected first")


def pytest_collection_modifyitems(items):
    """`slow` tests first, the rest in their usual order. pytest-xdist hands tests out in collection
    order, so a slow test collected late runs alone at the end while the other worker has nothing left."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def xla_flags(*flags: str, fast_compile: bool = True) -> str:
    """XLA_FLAGS for a process a test starts: the session's (the fast compile above) plus `flags`, e.g.
    '--xla_force_host_platform_device_count=2'; `fast_compile=False` leaves LLVM's default optimisation."""
    session = os.environ.get("XLA_FLAGS", "")
    if not fast_compile:
        session = " ".join(f for f in session.split() if f != FAST_COMPILE_XLA_FLAGS)
    return " ".join([session, *flags]).strip()


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
