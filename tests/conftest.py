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
    """The quick config shrunk to seconds: 8-channel ResNet, 32 px, batch 8, queue 16, small decoder."""
    config = cub.get_config("quick")
    config.model.name = "resnet_tiny"
    config.model.init = "none"
    config.model.frozen_stages = 0
    config.model.bn_groups = 2
    config.data.image_size = 32
    config.global_batch_size = 8
    config.moco.queue_size = 16
    config.moco.momentum = 0.9
    config.optim.learning_rate = 0.05
    config.num_epochs = 1
    config.eval.batch_size = 16
    config.eval.knn_k = 3  # tiny folders have 18 train images
    config.log_every_steps = 1
    config.fgpair.decoder_channels = (16, 8)
    config.fgpair.pair_stride = 1
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


@pytest.fixture
def tiny_cub(tmp_path):
    return write_tiny_cub(str(tmp_path / "CUB_200_2011"))


def requires_shared_cub():
    """Skip (not fail) when the shared CUB subset is not beside the repository."""
    if not os.path.isdir(os.path.join(SHARED_CUB, "images")):
        pytest.skip(f"shared CUB subset not found at {SHARED_CUB}")
    return SHARED_CUB
