"""Optimiser: schedule shape, and frozen encoder modules that truly stay frozen."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import cub
from fgpair_jax import optim, run_config
from fgpair_jax.errors import ConfigError


def test_warmup_then_cosine_to_zero():
    config = cub.get_config("quick")
    config.num_epochs, config.optim.warmup_epochs, config.optim.learning_rate = 4, 1, 0.4
    schedule = optim.learning_rate_schedule(config, steps_per_epoch=10)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(10)), 0.4, rtol=1e-6)  # peak at the end of the warm-up
    np.testing.assert_allclose(float(schedule(25)), 0.2, rtol=1e-5)  # cosine half-way through the decay
    assert float(schedule(40)) < 1e-8


def test_frozen_modules_get_no_update_not_even_weight_decay():
    config = cub.get_config("quick")  # EfficientNet-Lite0 with frozen_stages = 4
    params = {"encoder": {"conv_stem": {"kernel": jnp.ones(3)}, "blocks_7": {"kernel": jnp.ones(3)},
                          "blocks_8": {"kernel": jnp.ones(3)}},
              "head": {"fc1": {"kernel": jnp.ones(3)}}}
    tx = optim.make_optimizer(config, steps_per_epoch=10)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["encoder"]["conv_stem"]["kernel"], 1.0)  # stem: frozen
    np.testing.assert_array_equal(params["encoder"]["blocks_7"]["kernel"], 1.0)  # last block of stage 4
    assert float(params["encoder"]["blocks_8"]["kernel"][0]) < 1.0  # first block of stage 5 trains
    assert float(params["head"]["fc1"]["kernel"][0]) < 1.0


def test_decoder_has_its_own_adam_and_the_rest_sgd():
    config = cub.get_config("quick")  # method fgpair, decoder_optimizer adam at 1e-3
    config.model.frozen_stages = 0
    params = {"encoder": {"blocks_0": {"kernel": jnp.ones(2)}}, "decoder": {"to_rgb": {"kernel": jnp.ones(2)}}}
    tx = optim.make_optimizer(config, steps_per_epoch=10)
    grads = {"encoder": {"blocks_0": {"kernel": jnp.full(2, 5.0)}}, "decoder": {"to_rgb": {"kernel": jnp.full(2, 5.0)}}}
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step is -lr * sign(g) whatever the gradient's scale; SGD's is -lr * (g + wd * w).
    np.testing.assert_allclose(updates["decoder"]["to_rgb"]["kernel"], -1e-3, rtol=1e-4)
    expected_sgd = -config.optim.learning_rate * (5.0 + config.optim.weight_decay)
    np.testing.assert_allclose(updates["encoder"]["blocks_0"]["kernel"], expected_sgd, rtol=1e-5)


def test_encoder_lr_scale_slows_only_the_encoder_and_one_keeps_the_old_state_layout():
    config = cub.get_config("quick")
    config.model.frozen_stages = 0
    params = {"encoder": {"blocks_0": {"kernel": jnp.ones(2)}}, "head": {"fc1": {"kernel": jnp.ones(2)}}}
    grads = jax.tree.map(lambda x: jnp.full_like(x, 5.0), params)
    same = optim.make_optimizer(config, steps_per_epoch=10)
    config.optim.encoder_lr_scale = 0.1
    scaled = optim.make_optimizer(config, steps_per_epoch=10)
    same_updates, _ = same.update(grads, same.init(params), params)
    scaled_updates, _ = scaled.update(grads, scaled.init(params), params)
    np.testing.assert_allclose(scaled_updates["head"]["fc1"]["kernel"], same_updates["head"]["fc1"]["kernel"])
    np.testing.assert_allclose(scaled_updates["encoder"]["blocks_0"]["kernel"],
                               0.1 * same_updates["encoder"]["blocks_0"]["kernel"], rtol=1e-6)
    assert set(same.init(params).inner_states) == {"trained", "frozen", "decoder"}  # as before the knob
    config.optim.encoder_lr_scale = -1.0
    with pytest.raises(ConfigError, match="encoder_lr_scale=-1.0"):
        run_config.validate(config)
