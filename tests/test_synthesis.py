"""Grad-CAM importance, the two criteria, masks and perturbation (`gradcam.py`, `synthesis.py`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgpair_jax import contrastive, gradcam, synthesis


def small_contrastive_loss(head, keys, queue):
    """A small 'model tail': mean pooling -> linear head -> normalise -> InfoNCE, as L_C is."""
    def loss_of_map(feature_map):
        pooled = jnp.mean(feature_map, axis=(1, 2))
        return contrastive.info_nce(contrastive.l2_normalize(pooled @ head), keys, queue, 0.2)[0]
    return loss_of_map


def test_gradcam_weight_matches_central_finite_differences():
    rng = np.random.default_rng(0)
    feature_map = jnp.asarray(rng.uniform(0, 2, (3, 2, 2, 5)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    keys = contrastive.l2_normalize(jnp.asarray(rng.normal(size=(3, 4)), jnp.float32))
    queue = contrastive.l2_normalize(jnp.asarray(rng.normal(size=(6, 4)), jnp.float32))
    loss_of_map = small_contrastive_loss(head, keys, queue)
    gradient = gradcam.loss_gradient_wrt_feature_map(loss_of_map, feature_map)
    importance = gradcam.channel_importance(feature_map, gradient, "weight")
    # w_d = mean_{b,h,w}(-dL/dA_d) = -(1/(B h w)) dL/d(eps) for A_d += eps at every position.
    eps, positions = 1e-2, 3 * 2 * 2
    for d in range(5):
        shift = jnp.zeros(5).at[d].set(eps)
        finite = (loss_of_map(feature_map + shift) - loss_of_map(feature_map - shift)) / (2 * eps)
        np.testing.assert_allclose(float(importance[d]), -float(finite) / positions, rtol=2e-2, atol=1e-5)


def test_gradcam_weight_closed_form_for_a_linear_head():
    """L = sum_b u . mean_hw(A_b)  =>  dL/dA_bhwd = u_d / (h w)  =>  w_d = -u_d / (h w)."""
    u = jnp.array([1.0, -2.0, 0.0, 0.5])
    feature_map = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
    gradient = gradcam.loss_gradient_wrt_feature_map(
        lambda a: jnp.sum(jnp.mean(a, axis=(1, 2)) @ u), feature_map)
    np.testing.assert_allclose(gradcam.channel_importance(feature_map, gradient, "weight"), -u / 9, rtol=1e-6)
    np.testing.assert_allclose(gradcam.channel_importance(feature_map, gradient, "abs_weight"),
                               jnp.abs(u) / 9, rtol=1e-6)
    lcr = gradcam.channel_importance(feature_map, gradient, "grad_x_activation")
    np.testing.assert_allclose(lcr, jnp.mean(feature_map, axis=(0, 1, 2)) * -u / 9, rtol=1e-5, atol=1e-7)


def test_gradcam_criterion_finds_dimensions_that_do_not_affect_the_loss():
    rng = np.random.default_rng(1)
    head = rng.normal(size=(8, 4)).astype(np.float32)
    head[[1, 6]] = 0.0  # dimensions 1 and 6 never reach the loss
    keys = contrastive.l2_normalize(jnp.asarray(rng.normal(size=(4, 4)), jnp.float32))
    queue = contrastive.l2_normalize(jnp.asarray(rng.normal(size=(8, 4)), jnp.float32))
    feature_map = jnp.asarray(rng.uniform(0, 1, (4, 2, 2, 8)), jnp.float32)
    gradient = gradcam.loss_gradient_wrt_feature_map(small_contrastive_loss(jnp.asarray(head), keys, queue),
                                                     feature_map)
    importance = gradcam.channel_importance(feature_map, gradient, "abs_weight")
    mask = synthesis.lowest_fraction_mask(importance, 2 / 8)
    assert set(np.flatnonzero(mask)) == {1, 6}


def test_gradcam_maps_and_normalisation():
    feature_map = jnp.ones((1, 2, 2, 3)).at[0, 0, 0].set(3.0)
    gradient = -jnp.ones((1, 2, 2, 3))  # every channel helps: weights 1
    cam = gradcam.gradcam_maps(feature_map, gradient)
    np.testing.assert_allclose(cam[0], [[9.0, 3.0], [3.0, 3.0]])
    distribution = gradcam.normalize_map(jnp.concatenate([cam, jnp.zeros_like(cam)]))
    np.testing.assert_allclose(distribution.sum(axis=(1, 2)), [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(distribution[1], 0.25)  # an all-zero map becomes uniform


def test_unknown_importance_score_is_a_clear_error():
    with pytest.raises(ValueError, match="gradcam_score"):
        gradcam.channel_importance(jnp.ones((1, 1, 1, 2)), jnp.ones((1, 1, 1, 2)), "bogus")


def test_variance_criterion_finds_planted_low_variance_dimensions():
    rng = np.random.default_rng(2)
    pooled = rng.normal(5.0, 2.0, (128, 10)).astype(np.float32)
    pooled[:, [3, 8]] = 5.0 + rng.normal(0, 0.01, (128, 2))
    mask = synthesis.lowest_fraction_mask(synthesis.feature_variance(jnp.asarray(pooled)), 0.2)
    assert set(np.flatnonzero(mask)) == {3, 8}


def test_relative_variance_ignores_scale():
    rng = np.random.default_rng(3)
    base = rng.uniform(0.5, 1.5, (64, 4)).astype(np.float32)
    scaled = base * np.array([1.0, 100.0, 0.1, 1.0], np.float32)
    raw = synthesis.feature_variance(jnp.asarray(scaled))
    relative = synthesis.feature_variance(jnp.asarray(scaled), relative=True)
    assert int(jnp.argmin(raw)) == 2  # raw variance follows the scale
    np.testing.assert_allclose(relative, synthesis.feature_variance(jnp.asarray(base), relative=True), rtol=1e-3)


def test_variance_ema_starts_from_the_first_batch_then_averages():
    ema, initialized = synthesis.update_variance_ema(jnp.zeros(2), jnp.array([4.0, 2.0]), 0.9, jnp.bool_(False))
    np.testing.assert_allclose(ema, [4.0, 2.0])
    ema, _ = synthesis.update_variance_ema(ema, jnp.array([0.0, 12.0]), 0.9, initialized)
    np.testing.assert_allclose(ema, [3.6, 3.0], rtol=1e-6)


def test_masks_count_combine_and_random():
    scores = jnp.array([5.0, 1.0, 3.0, 0.0, 4.0, 2.0])
    np.testing.assert_array_equal(synthesis.lowest_fraction_mask(scores, 0.5), [0, 1, 0, 1, 0, 1])
    a, b = jnp.array([1.0, 1, 0, 0]), jnp.array([0.0, 1, 1, 0])
    np.testing.assert_array_equal(synthesis.combine_masks(a, b, "union"), [1, 1, 1, 0])
    np.testing.assert_array_equal(synthesis.combine_masks(a, b, "intersection"), [0, 1, 0, 0])
    with pytest.raises(ValueError, match="config.fgpair.combine"):
        synthesis.combine_masks(a, b, "xor")
    masks = [synthesis.random_mask(jax.random.key(i), jnp.int32(3), 16) for i in range(4)]
    assert all(float(m.sum()) == 3 for m in masks)
    assert len({tuple(np.asarray(m)) for m in masks}) > 1


@pytest.mark.parametrize("mode", ["gaussian", "shuffle"])
def test_perturbation_touches_masked_dimensions_only(mode):
    pooled = jax.random.uniform(jax.random.key(0), (64, 12)) * jnp.arange(1, 13)
    mask = jnp.zeros(12).at[jnp.array([0, 5, 7])].set(1.0)
    perturbed = synthesis.perturb(jax.random.key(1), pooled, mask, mode, sigma=1.0)
    keep = np.asarray(mask) == 0
    np.testing.assert_array_equal(np.asarray(perturbed)[:, keep], np.asarray(pooled)[:, keep])  # bit-identical
    assert np.all(np.any(np.asarray(perturbed)[:, ~keep] != np.asarray(pooled)[:, ~keep], axis=0))
    if mode == "shuffle":  # masked columns are permutations of themselves
        for d in (0, 5, 7):
            np.testing.assert_array_equal(np.sort(perturbed[:, d]), np.sort(pooled[:, d]))


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_gaussian_perturbation_has_the_configured_scale(sigma):
    pooled = jax.random.normal(jax.random.key(2), (4096, 3)) * jnp.array([0.1, 1.0, 10.0])
    mask = jnp.ones(3)
    noise = synthesis.perturb(jax.random.key(3), pooled, mask, "gaussian", sigma) - pooled
    ratio = np.std(np.asarray(noise), axis=0) / np.std(np.asarray(pooled), axis=0)
    np.testing.assert_allclose(ratio, sigma, rtol=0.05)


def test_unknown_perturbation_is_a_clear_error():
    with pytest.raises(ValueError, match="config.fgpair.perturbation"):
        synthesis.perturb(jax.random.key(0), jnp.ones((2, 2)), jnp.ones(2), "dropout")
