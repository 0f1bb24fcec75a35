"""The fgpair method: where gradients flow, what reproduces MoCo, what L_R learns (LCR: test_lcr.py)."""
import functools
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_CUB, requires_shared_cub, tiny_config
from fgpair_jax import optim, parallel, state as state_lib, step as step_lib
from fgpair_jax.data import augment
from fgpair_jax.methods import fgpair, moco
from fgpair_jax.models.decoder import Decoder, decoder_geometry


def make_state(config):
    tx = optim.make_optimizer(config, steps_per_epoch=1000)
    return state_lib.create_train_state(config, jax.random.key(0), tx, state_lib.method_sizes(config, None)), tx


def views(config, seed=0):
    shape = (config.global_batch_size, config.data.image_size, config.data.image_size, 3)
    rng = np.random.default_rng(seed)
    return tuple(augment.normalize(jnp.asarray(rng.integers(0, 256, shape, dtype=np.uint8))) for _ in range(2))


@functools.lru_cache(maxsize=None)
def gradient_fn(**overrides):
    """(state, views, jitted epoch -> (grads, aux)) of the fgpair loss for tiny_config(**overrides).

    The epoch is an argument, not a constant, so one compile serves the warm-up and after it: each
    compile of the fgpair gradient takes tens of seconds on CPU, the bulk of this file's time.
    """
    config = tiny_config(method="fgpair", **overrides)
    state, _ = make_state(config)
    view1, view2 = views(config)

    def grads_and_aux(epoch):
        loss_fn = lambda p: fgpair.loss(p, state, view1, view2, jax.random.key(1), config, epoch=epoch)  # noqa: E731
        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return grads, aux

    return state, (view1, view2), jax.jit(grads_and_aux)


def gradients(epoch=5.0, **overrides):
    return gradient_fn(**overrides)[2](jnp.float32(epoch))


def norm(tree):
    return float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


STEP_AT_2 = {"fgpair.warmup_epochs": 2, "fgpair.ramp_epochs": 0}  # L_Cp off before epoch 2, full after


@pytest.mark.slow
def test_decoder_learns_only_from_reconstruction_and_encoder_from_contrast_and_pairs():
    grads, aux = gradients(5.0, **STEP_AT_2)
    assert float(aux["metrics"]["loss_pair"]) > 0 and float(aux["metrics"]["pair_weight"]) == 1.0
    assert norm(grads["decoder"]) > 0.0  # L_R trains the decoder
    grads_no_recon, _ = gradients(5.0, **STEP_AT_2, **{"fgpair.alpha": 0.0})
    assert norm(grads_no_recon["decoder"]) == 0.0  # L_Cp and L_C give the decoder nothing
    for a, b in zip(jax.tree.leaves(grads["encoder"]), jax.tree.leaves(grads_no_recon["encoder"])):
        np.testing.assert_array_equal(a, b)  # and L_R gives the encoder nothing (the default)
    grads_before_pairs, _ = gradients(1.0, **STEP_AT_2)
    difference = jax.tree.map(lambda a, b: a - b, grads["encoder"], grads_before_pairs["encoder"])
    assert norm(difference) > 1e-8 * norm(grads["encoder"])  # L_Cp reaches the encoder


def test_fgpair_contrastive_term_is_mocos_loss():
    """fgpair's L_C is MoCo v2's loss for the same state, batch and rng (fgpair hands MoCo the first split)."""
    state, (view1, view2), _ = gradient_fn(**STEP_AT_2)
    _, aux = gradients(5.0, **STEP_AT_2)
    config = tiny_config(method="fgpair", **STEP_AT_2)
    moco_loss = jax.jit(lambda rng: moco.loss(state.params, state, view1, view2, rng, config, epoch=5.0)[0])
    expected = float(moco_loss(jax.random.split(jax.random.key(1), 4)[0]))
    np.testing.assert_allclose(float(aux["metrics"]["loss_contrastive"]), expected, rtol=1e-6)
    assert abs(float(moco_loss(jax.random.key(2))) - expected) > 1e-4  # the rng matters: the check can fail


def test_pair_loss_waits_for_the_decoder_warmup_then_ramps():
    config = tiny_config(method="fgpair", **{"fgpair.warmup_epochs": 2, "fgpair.ramp_epochs": 4, "fgpair.nu": 0.5})
    weights = [float(fgpair.pair_weight(config, jnp.float32(e))) for e in (0.0, 1.9, 2.0, 4.0, 6.0, 9.0)]
    np.testing.assert_allclose(weights, [0, 0, 0, 0.25, 0.5, 0.5], atol=1e-7)
    grads_warmup, aux = gradients(1.0, **STEP_AT_2)
    assert float(aux["metrics"]["pair_weight"]) == 0.0
    grads_without_pairs, _ = gradients(1.0, **STEP_AT_2, **{"fgpair.nu": 0.0})
    for a, b in zip(jax.tree.leaves(grads_warmup), jax.tree.leaves(grads_without_pairs)):
        np.testing.assert_array_equal(a, b)  # during the warm-up L_Cp contributes nothing


def test_moco_step_reproduces_the_slice():
    """The MoCo step after the method registry and fgpair landed gives the numbers the MoCo slice gave.

    Reference values were produced by tests/run_steps.py at commit 0ede21d (the MoCo v2 slice, before
    this issue) on this CPU configuration: losses of 3 steps on fixed batches.
    """
    from run_steps import run
    _, history = run(3, "moco")
    np.testing.assert_allclose([h["loss"] for h in history], SLICE_MOCO_LOSSES, rtol=1e-5)


SLICE_MOCO_LOSSES = [1.1555689573287964, 2.4128613471984863, 3.0095632076263428]


@pytest.mark.parametrize("size, expected", [(96, (6, 4)), (112, (7, 4)), (224, (7, 5)), (32, (4, 3))])
def test_decoder_geometry_and_output_shape(size, expected):
    assert decoder_geometry(size) == expected
    out, _ = jax.eval_shape(lambda: Decoder(size, channels=(8, 4)).init_with_output(
        jax.random.key(0), jnp.ones((2, 16))))
    assert out.shape == (2, size, size, 3)


def test_decoder_rejects_unreachable_sizes():
    with pytest.raises(ValueError, match="config.data.image_size"):
        decoder_geometry(100 * 9)


def load_real_images(count, size):
    paths = sorted(glob.glob(os.path.join(SHARED_CUB, "images", "*", "*.jpg")))[::59][:count]
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in paths])


@pytest.mark.slow
def test_reconstruction_loss_falls_on_real_images():
    requires_shared_cub()
    config = tiny_config(method="fgpair", **{"global_batch_size": 16, "moco.queue_size": 32})
    images = load_real_images(64, config.data.image_size)
    mesh = parallel.make_mesh()
    state, tx = make_state(config)
    train_step = step_lib.make_train_step(config, tx, mesh, steps_per_epoch=1000)
    state = jax.device_put(state, parallel.replicated(mesh))
    losses = []
    for step in range(40):
        chunk = images[(step * 16) % 64:][:16]
        state, metrics = train_step(state, parallel.global_batch({"view1": chunk, "view2": chunk}, mesh))
        losses.append(float(metrics["loss_reconstruction"]))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
