"""GroupedBatchNorm: per-group statistics against numpy; one group equals flax's BatchNorm."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fgpair_jax.models.norm import GroupedBatchNorm


def test_each_group_is_normalised_with_its_own_statistics():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3, 3, 4)).astype(np.float32) * 3 + np.arange(8)[:, None, None, None]
    module = GroupedBatchNorm(num_groups=4, epsilon=1e-5)
    variables = module.init(jax.random.key(0), x)
    y, updates = module.apply(variables, x, mutable=["batch_stats"])
    groups = x.reshape(4, 2, 3, 3, 4)
    mean = groups.mean(axis=(1, 2, 3), keepdims=True)
    var = groups.var(axis=(1, 2, 3), keepdims=True)
    expected = ((groups - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * mean.reshape(4, 4).mean(0), atol=1e-5)


def test_one_group_matches_flax_batchnorm():
    x = jax.random.normal(jax.random.key(1), (6, 5, 5, 3)) * 2 + 1
    ours = GroupedBatchNorm(num_groups=1, momentum=0.9)
    theirs = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    v_ours, v_theirs = ours.init(jax.random.key(0), x), theirs.init(jax.random.key(0), x)
    y_ours, s_ours = ours.apply(v_ours, x, mutable=["batch_stats"])
    y_theirs, s_theirs = theirs.apply(v_theirs, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y_ours, y_theirs, atol=1e-5)
    np.testing.assert_allclose(s_ours["batch_stats"]["mean"], s_theirs["batch_stats"]["mean"], atol=1e-6)


def test_running_average_mode_uses_stored_statistics():
    module = GroupedBatchNorm(use_running_average=True)
    variables = {"params": {"scale": jnp.full((2,), 2.0), "bias": jnp.ones((2,))},
                 "batch_stats": {"mean": jnp.array([1.0, -1.0]), "var": jnp.array([4.0, 1.0])}}
    y = module.apply(variables, jnp.array([[3.0, 0.0]]))
    np.testing.assert_allclose(y, [[2.0 * 2 / np.sqrt(4 + 1e-5) + 1, 2.0 * 1 / np.sqrt(1 + 1e-5) + 1]], rtol=1e-5)


def test_batch_not_divisible_by_groups_is_a_clear_error():
    module = GroupedBatchNorm(num_groups=3)
    with pytest.raises(ValueError, match="config.model.bn_groups|bn_groups"):
        module.init(jax.random.key(0), jnp.ones((4, 2)))
