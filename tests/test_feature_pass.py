"""The evaluation feature pass (`fgpair_jax/features.py`) compiles once per batch shape."""
import collections

import jax
import numpy as np
from jax._src import dispatch

from conftest import tiny_config
from fgpair_jax import features, optim, parallel, state as state_lib


def image_source(count: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), "label": i % 3} for i in range(count)]


def test_both_splits_partial_batches_and_a_second_feature_function_share_one_compile():
    """Train (20 images: a full batch of 12 and a padded one) and test (7: one padded batch), through
    two feature functions of one config, as the kNN monitor and the final evaluation make them: one
    compile request for the feature program (a persistent-cache hit counts too)."""
    config = tiny_config(**{"eval.batch_size": 12})  # a batch shape no other test compiles this program for
    mesh = parallel.make_mesh()
    tx = optim.make_optimizer(config, steps_per_epoch=10)
    state = state_lib.create_train_state(config, jax.random.key(0), tx, state_lib.method_sizes(config, None))
    compiles = collections.Counter()

    def count(event, duration, fun_name="", **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            compiles[fun_name] += 1

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        monitor = features.make_feature_fn(config, mesh)
        train = features.extract_features(monitor, state.params, state.batch_stats, image_source(20, 0), config,
                                          mesh, "train")
        final = features.make_feature_fn(config, mesh)
        test = features.extract_features(final, state.params, state.batch_stats, image_source(7, 1), config, mesh,
                                         "test")
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert compiles["jit(encoder_features)"] == 1, dict(compiles)
    assert train[0].shape[0] == 20 and test[0].shape[0] == 7 and train[0].shape[1] == test[0].shape[1]
    assert np.isfinite(train[0]).all() and np.isfinite(test[0]).all()
    np.testing.assert_array_equal(test[1], np.arange(7) % 3)
