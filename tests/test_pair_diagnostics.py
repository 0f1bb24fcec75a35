"""fgpair's pair variants and diagnostics: residual pairs, pair_contrast, L_Cp's gradient share,
the warm-up warning, and the linear probe's grid edge."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fgpair_jax import step as step_lib
from fgpair_jax.evaluation.linear_probe import linear_probe
from fgpair_jax.methods import fgpair
from test_fgpair import STEP_AT_2, gradient_fn, gradients


def test_pair_modes_make_the_pairs_they_name():
    rng = np.random.default_rng(0)
    reconstruction, perturbed, real = (jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32) for _ in range(3))
    a, b = fgpair.pair_images(reconstruction, perturbed, real, tiny_config(method="fgpair"))
    np.testing.assert_array_equal(a, reconstruction)
    np.testing.assert_array_equal(b, perturbed)
    a, b = fgpair.pair_images(reconstruction, perturbed, real, tiny_config(**{"fgpair.pair_mode": "residual"}))
    np.testing.assert_array_equal(a, real)
    np.testing.assert_allclose(b - a, perturbed - reconstruction, atol=1e-6)  # exactly the rendered perturbation
    with pytest.raises(ValueError, match="pair_mode='swapped'"):
        fgpair.pair_images(reconstruction, perturbed, real, tiny_config(**{"fgpair.pair_mode": "swapped"}))


def test_pair_titles_name_what_the_decoder_renders():
    assert fgpair.pair_titles(tiny_config(method="fgpair")) == ("x_a = d(h)", "x_b = d(h')")
    spatial_residual = tiny_config(**{"fgpair.pair_mode": "residual", "fgpair.decode_from": "feature_map"})
    assert fgpair.pair_titles(spatial_residual) == ("x_a = x", "x_b = x + d(A') - d(A)")


def test_pair_contrast_against_a_numpy_reference():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
    a, b = images[:3], images[:3] + 0.1 * rng.normal(size=(3, 8, 8, 3)).astype(np.float32)
    expected = np.mean(np.abs(b - a)) / np.mean(np.abs(images - np.roll(images, 1, axis=0)))
    np.testing.assert_allclose(float(fgpair.contrast_ratio(a, b, images)), expected, rtol=1e-6)
    assert float(fgpair.contrast_ratio(a, a, images)) == 0.0
    between = np.mean(np.abs(images - np.roll(images, 1, axis=0)))
    each = [np.mean(np.abs(b[i] - a[i])) / between for i in range(3)]  # the figure's note beside each row
    np.testing.assert_allclose(np.asarray(fgpair.contrast_ratio_each(a, b, images)), each, rtol=1e-6)


def test_gradient_share_is_the_pair_terms_part_of_the_encoder_gradient():
    """The logged share equals ||g(with L_Cp) - g(without)|| / ||g(without)|| on the encoder, the
    reference taken from two ordinary gradients of the whole loss (L_Cp switched on by the epoch)."""
    options = dict(STEP_AT_2, **{"fgpair.log_gradient_share": True})
    state = gradient_fn(**options)[0]
    config = tiny_config(method="fgpair", **options)
    with_pairs, aux = gradients(5.0, **options)
    without_pairs, aux_off = gradients(1.0, **options)
    terms = jax.jit(lambda aux: fgpair.term_gradients(state.params, state, aux, config))
    term, term_off = terms(aux), terms(aux_off)
    difference = jax.tree.map(jnp.subtract, with_pairs["encoder"], without_pairs["encoder"])
    for got, want in zip(jax.tree.leaves(term["pair"]["encoder"]), jax.tree.leaves(difference)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    share = float(step_lib.gradient_shares(with_pairs, term)["grad_share_pair"])
    reference = float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(difference))) /
                      np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(without_pairs["encoder"]))))
    assert share > 0 and share == pytest.approx(reference, rel=1e-3)
    assert float(step_lib.gradient_shares(without_pairs, term_off)["grad_share_pair"]) == 0.0
    assert 0.0 <= float(aux["metrics"]["pair_contrast"])
    assert fgpair.term_gradients(state.params, state, {}, config) == {}  # the switch off: no pair inputs kept


def test_the_gradient_share_is_measured_on_logged_steps_only():
    """`step.logged_gradient_shares` runs the extra backward pass under lax.cond: the share on a logged
    step, NaN (not measured) on the others, which the epoch means leave out; a method without terms adds
    no metric. The logging rule is the train loop's: every log_every_steps-th step and the last."""
    from fgpair_jax import train

    assert [s for s in range(1, 11) if step_lib.is_logged_step(s, 4, 10)] == [4, 8, 10]
    grads = {"encoder": {"w": jnp.array([3.0, 4.0])}}
    term = {"pair": {"encoder": {"w": jnp.array([0.0, 4.0])}}}  # the rest is [3, 0]: share 4 / 3
    shares = jax.jit(lambda logged: step_lib.logged_gradient_shares(logged, grads, lambda: term))
    assert float(shares(True)["grad_share_pair"]) == pytest.approx(4.0 / 3.0)
    assert np.isnan(float(shares(False)["grad_share_pair"]))
    assert step_lib.logged_gradient_shares(jnp.bool_(True), grads, lambda: {}) == {}
    history = [{"loss": jnp.float32(1.0), "grad_share_pair": jnp.float32(2.0)},
               {"loss": jnp.float32(3.0), "grad_share_pair": jnp.float32(np.nan)}]
    assert train._mean_metrics(history) == {"loss": 2.0, "grad_share_pair": 2.0}
    unmeasured = [{"loss": jnp.float32(np.nan), "grad_share_pair": jnp.float32(np.nan)}]
    means = train._mean_metrics(unmeasured)
    assert "grad_share_pair" not in means and np.isnan(means["loss"])  # a non-finite loss stays visible


def test_a_run_whose_pairs_never_switch_on_warns(caplog):
    with caplog.at_level(logging.WARNING):
        fgpair.validate(tiny_config(method="fgpair", num_epochs=1, **{"fgpair.warmup_epochs": 1.0}))
    assert any("L_Cp never switches on" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fgpair.validate(tiny_config(method="fgpair", num_epochs=4, **{"fgpair.warmup_epochs": 1.0}))
    assert not any("never switches on" in record.getMessage() for record in caplog.records)


def test_linear_probe_says_when_its_choice_is_at_the_grid_edge():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    features = rng.normal(size=(60, 8)) + 3.0 * np.eye(8)[labels]
    one = linear_probe(features, labels, features, labels, weight_decays=(1e-3,))
    assert one["at_grid_edge"] is False  # a grid of one value has no edge to widen
    probe = linear_probe(features, labels, features, labels, weight_decays=(1e-4, 1e-2, 1.0))
    assert probe["at_grid_edge"] == (probe["weight_decay"] in (1e-4, 1.0))


@pytest.mark.parametrize("side,size", [(4, 112), (1, 32), (7, 224)])
def test_spatial_decoder_renders_any_map_at_the_image_size(side, size):
    from fgpair_jax.models.decoder import SpatialDecoder

    decoder = SpatialDecoder(image_size=size, channels=(16, 8))
    feature_map = jnp.ones((2, side, side, 12))
    params = decoder.init(jax.random.key(0), jnp.zeros((1, 2, 2, 12)))  # parameters do not depend on h, w
    assert decoder.apply(params, feature_map).shape == (2, size, size, 3)


def test_spatial_pairs_perturb_masked_channels_at_every_position():
    from fgpair_jax import synthesis

    feature_map = jax.random.normal(jax.random.key(0), (4, 3, 3, 6))
    mask = jnp.array([1, 0, 0, 1, 0, 0], jnp.float32)
    perturbed = synthesis.perturb(jax.random.key(1), feature_map, mask, "gaussian", 1.0)
    changed = np.asarray(perturbed != feature_map)
    assert changed[..., [0, 3]].all() and not changed[..., [1, 2, 4, 5]].any()
    config = tiny_config(method="fgpair", **{"fgpair.decode_from": "feature_map", "fgpair.pair_mode": "residual"})
    from fgpair_jax import optim, state as state_lib

    state = state_lib.create_train_state(config, jax.random.key(0), optim.make_optimizer(config, 2), {"queue_size": 16})
    arrays = fgpair.figure_arrays(state, jax.random.normal(jax.random.key(1), (8, 32, 32, 3)), jax.random.key(2),
                                  config)
    assert arrays["pair_a"].shape == arrays["pair_b"].shape == (8, 32, 32, 3)
    assert arrays["pair_titles"] == ("x_a = x", "x_b = x + d(A') - d(A)")
    assert set(arrays["diagnostics"]) == {"pair_contrast", "pair_feature_distance"}
