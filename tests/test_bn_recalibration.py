"""BN recalibration for evaluation: the fixed point of the running average, independent of the old
statistics, frozen layers untouched."""
import jax
import numpy as np
import pytest

from conftest import tiny_config
from fgpair_jax import parallel
from fgpair_jax.data import pipeline
from fgpair_jax.features import make_statistics_fn, recalibrated_batch_stats
from fgpair_jax.methods import moco


def image_source(count: int, size: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "label": i % 3} for i in range(count)]


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_equals_the_running_average_after_many_updates_on_the_same_batch():
    """A split made of one batch repeated: every batch has the same statistics, so the recalibrated
    value is where the running average itself converges after many train-mode updates on that batch."""
    config = tiny_config(**{"eval.batch_size": 8})
    mesh = parallel.make_mesh()
    variables = moco.init_variables(jax.random.key(0), config)
    batch = image_source(8, 40)
    recalibrated = recalibrated_batch_stats(variables["params"], variables["batch_stats"], batch * 3, config, mesh)

    images = np.stack([pipeline.eval_transform(e["image"], config.data.image_size) for e in batch])
    update = make_statistics_fn(config, mesh)
    stats = variables["batch_stats"]["encoder"]
    for _ in range(200):  # momentum 0.9: 0.9**200 ~ 7e-10 of the start is left
        stats = update(variables["params"], stats, images)
    for got, want in zip(leaves(recalibrated["encoder"]), leaves(stats)):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)


def test_result_does_not_depend_on_the_statistics_it_starts_from():
    config = tiny_config(**{"eval.batch_size": 8})
    mesh = parallel.make_mesh()
    variables = moco.init_variables(jax.random.key(0), config)
    source = image_source(20, 40, seed=1)
    corrupted = jax.tree.map(lambda x: x * 7.0 + 3.0, variables["batch_stats"])
    from_init = recalibrated_batch_stats(variables["params"], variables["batch_stats"], source, config, mesh)
    from_corrupted = recalibrated_batch_stats(variables["params"], corrupted, source, config, mesh)
    for a, b, old in zip(leaves(from_init), leaves(from_corrupted), leaves(corrupted)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        assert not np.allclose(a, old)  # every layer of this model updates


@pytest.mark.slow
def test_frozen_layers_keep_their_statistics_and_feed_the_others_with_them():
    """EfficientNet-Lite0 with its stem and first stage frozen (they normalise with running statistics
    even in train mode). The updating layers must get the fixed point computed from one train-mode
    update that starts from the real statistics and the model's own momentum constant."""
    from fgpair_jax.models.efficientnet_lite import BN_MOMENTUM

    config = tiny_config(**{"eval.batch_size": 8, "model.name": "efficientnet_lite0", "model.frozen_stages": 1})
    mesh = parallel.make_mesh()
    variables = moco.init_variables(jax.random.key(0), config)
    stats = jax.tree.map(lambda x: x + 0.5, variables["batch_stats"])  # not what the images would give
    batch = image_source(8, 40)
    out = recalibrated_batch_stats(variables["params"], stats, batch * 2, config, mesh)

    images = np.stack([pipeline.eval_transform(e["image"], config.data.image_size) for e in batch])
    updated = make_statistics_fn(config, mesh)(variables["params"], stats["encoder"], images)
    for name in ("conv_stem", "bn0", "blocks_0"):
        for got, kept in zip(leaves(out["encoder"].get(name, {})), leaves(stats["encoder"].get(name, {}))):
            np.testing.assert_array_equal(got, kept)  # frozen: unchanged
    expected = jax.tree.map(lambda new, old: (new - BN_MOMENTUM * old) / (1 - BN_MOMENTUM), updated, stats["encoder"])
    for name in ("blocks_1", "blocks_5", "bn1"):
        for got, want in zip(leaves(out["encoder"][name]), leaves(expected[name])):
            np.testing.assert_allclose(got, want, rtol=5e-3, atol=5e-3)


def test_too_few_train_images_is_a_clear_error():
    config = tiny_config(**{"eval.batch_size": 16})
    variables = moco.init_variables(jax.random.key(0), config)
    with pytest.raises(ValueError, match="lower config.eval.batch_size"):
        recalibrated_batch_stats(variables["params"], variables["batch_stats"], image_source(10, 40), config,
                                 parallel.make_mesh())
