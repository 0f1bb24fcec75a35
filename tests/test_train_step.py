"""The jitted MoCo step: multi-device equality, learning on tiny data, exact resume, checkpoint guards."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_config, xla_flags
from fgpair_jax import checkpointing, optim, parallel, state as state_lib, step as step_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def run_in_subprocess(tmp_path, num_devices: int, num_steps: int, method: str = "moco", **env_vars) -> dict:
    tag = "".join(f"_{name}{value}" for name, value in env_vars.items())
    out = str(tmp_path / f"steps_{num_devices}dev_{method}{tag}.npz")
    env = dict(os.environ, XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={num_devices}"),
               JAX_PLATFORMS="cpu", **env_vars)
    subprocess.run([sys.executable, os.path.join(HERE, "run_steps.py"), out, str(num_steps), method],
                   check=True, env=env, capture_output=True, timeout=600)
    return dict(np.load(out))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fgpair", "fgpair_byol"])
def test_one_step_on_two_devices_equals_one_device(tmp_path, method):
    """simsiam and byol normalise over the global batch (SyncBN, one function for both): their BN
    statistics, hence every leaf, must not depend on how many devices hold the batch either. fgpair's
    step holds MoCo's whole step (shuffle BN, queue, momentum encoder) and fgpair_byol's BYOL's (SyncBN,
    target network, predictor), so moco, simsiam and byol alone add no device-dependent code path (each
    pair of compiles costs a minute of CI)."""
    one = run_in_subprocess(tmp_path, 1, 1, method)
    two = run_in_subprocess(tmp_path, 2, 1, method)
    assert int(one.pop("devices")) == 1 and int(two.pop("devices")) == 2
    assert set(one) == set(two)
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_steps_under_64_bit_mode_equal_the_default_and_stay_32_bit(tmp_path):
    """A user's JAX_ENABLE_X64=1 crashed the first step (int32 and int64 queue indices); now it is the same step."""
    wide = run_in_subprocess(tmp_path, 1, 2, "fgpair", JAX_ENABLE_X64="1")
    default = run_in_subprocess(tmp_path, 1, 2, "fgpair", JAX_ENABLE_X64="0")
    assert set(wide) == set(default)
    for name in default:
        assert wide[name].dtype == default[name].dtype, name
        np.testing.assert_allclose(wide[name], default[name], rtol=1e-6, atol=1e-6, err_msg=name)


def fresh_state(config, mesh, tx):
    state = state_lib.create_train_state(config, jax.random.key(0), tx, state_lib.method_sizes(config, None))
    return jax.device_put(state, parallel.replicated(mesh))


def patterned_images(seed, count, size):
    """`count` distinct images: 4x4 random colour grids upsampled, so instance identity is learnable."""
    grids = np.random.default_rng(seed).integers(0, 256, (count, 4, 4, 3), dtype=np.uint8)
    return np.repeat(np.repeat(grids, size // 4, axis=1), size // 4, axis=2)


def batch_of(config, images, index):
    """The `index`-th batch of a fixed image set; both views are the same uint8 crop (the step augments)."""
    b = config.global_batch_size
    chunk = images[(index * b) % len(images):][:b]
    return {"view1": chunk, "view2": chunk}


def train_on(train_step, state, config, images, mesh, steps: int):
    """(state after `steps` steps on the batches `batch_of(config, images, 0..steps-1)`, each step's
    metrics on the host)."""
    history = []
    for index in range(steps):
        state, metrics = train_step(state, parallel.global_batch(batch_of(config, images, index), mesh))
        history.append(jax.device_get(metrics))
    return state, history


@pytest.fixture(scope="module")
def compiled():
    """One tiny config, optimiser and compiled step shared by the tests (compiling dominates their time)."""
    config = tiny_config(method="fgpair", **{"optim.learning_rate": 0.1, "fgpair.warmup_epochs": 0,
                                             "fgpair.log_gradient_share": True, "log_every_steps": 2})
    mesh = parallel.make_mesh()
    tx = optim.make_optimizer(config, steps_per_epoch=1000)  # near-constant learning rate over a test
    return config, mesh, tx, step_lib.make_train_step(config, tx, mesh, steps_per_epoch=1000)


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def test_save_restore_then_next_step_is_identical(tmp_path, compiled):
    config, mesh, tx, train_step = compiled
    images = patterned_images(0, 32, config.data.image_size)
    state, _ = train_on(train_step, fresh_state(config, mesh, tx), config, images, mesh, 2)

    checkpointer = checkpointing.Checkpointer(str(tmp_path / "ckpt"), 2, checkpointing.fingerprint(config, state))
    checkpointer.save(2, state, {"next_index": 2})
    checkpointer.close()
    next_batch = parallel.global_batch(batch_of(config, images, 2), mesh)
    reference_next, reference_metrics = train_step(state, next_batch)

    reopened = checkpointing.Checkpointer(str(tmp_path / "ckpt"), 2, checkpointing.fingerprint(config, state))
    restored = reopened.restore(fresh_state(config, mesh, tx))
    reopened.close()
    assert int(restored.step) == 2
    resumed_next, resumed_metrics = train_step(restored, parallel.global_batch(batch_of(config, images, 2), mesh))
    for a, b in zip(leaves(reference_next), leaves(resumed_next)):
        np.testing.assert_array_equal(a, b)
    assert float(reference_metrics["loss"]) == float(resumed_metrics["loss"])


def test_the_step_measures_the_gradient_share_on_logged_steps_only(compiled):
    """The real step with `fgpair.log_gradient_share` (log_every_steps 2): NaN on step 1, a finite
    share of the pair term on step 2."""
    config, mesh, tx, train_step = compiled
    images = patterned_images(0, 32, config.data.image_size)
    _, history = train_on(train_step, fresh_state(config, mesh, tx), config, images, mesh, 2)
    shares = [float(metrics["grad_share_pair"]) for metrics in history]
    assert np.isnan(shares[0]) and np.isfinite(shares[1]) and shares[1] >= 0, shares


def test_checkpoint_of_another_model_is_refused_and_left_untouched(tmp_path, compiled):
    config, mesh, tx, _ = compiled
    state = fresh_state(config, mesh, tx)
    directory = str(tmp_path / "ckpt")
    checkpointer = checkpointing.Checkpointer(directory, 2, checkpointing.fingerprint(config, state))
    checkpointer.save(0, state, {"next_index": 0})
    checkpointer.close()
    before = sorted(os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs)
    sizes = [os.path.getsize(p) for p in before]

    other = tiny_config(method="fgpair", **{"moco.dim": 32})
    other_state = fresh_state(other, mesh, optim.make_optimizer(other, steps_per_epoch=10))
    guard = checkpointing.Checkpointer(directory, 2, checkpointing.fingerprint(other, other_state))
    with pytest.raises(ValueError, match=r"Cannot resume .*shape .*new --workdir"):
        guard.restore(other_state)
    guard.close()
    after = sorted(os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs)
    assert after == before and [os.path.getsize(p) for p in after] == sizes


def test_ssl_loss_falls_on_tiny_data(compiled):
    """48 distinct images cycled with a queue of 16: the InfoNCE loss must fall as instances are learnt.

    Colour augmentation is softened (the images differ only by their colour grids; full MoCo jitter
    needs far more than 60 steps of an 8-channel net to see through), blur and brightness stay on.
    """
    config = tiny_config(method="moco", **{"optim.learning_rate": 0.1, "augment.saturation": 0.0, "augment.hue": 0.0,
                            "augment.grayscale_prob": 0.0, "augment.brightness": 0.2, "augment.contrast": 0.2})
    _, mesh, tx, _ = compiled
    train_step = step_lib.make_train_step(config, tx, mesh, steps_per_epoch=1000)
    images = patterned_images(1, 48, config.data.image_size)
    _, history = train_on(train_step, fresh_state(config, mesh, tx), config, images, mesh, 60)
    losses = [float(metrics["loss"]) for metrics in history]
    # From step 2 on the queue holds real keys; compare an early and a late window.
    early, late = np.mean(losses[2:12]), np.mean(losses[-10:])
    assert late < early - 0.5, (early, late, losses)


@pytest.mark.skipif(jax.default_backend() == "cpu" and not os.environ.get("FGPAIR_TEST_BF16"),
                    reason="a bfloat16 compile takes minutes on CPU (CI's 20-minute budget); runs on GPU/TPU, "
                           "or on CPU with FGPAIR_TEST_BF16=1")
def test_bfloat16_compute_keeps_float32_parameters_and_tracks_the_float32_loss(compiled):
    """What accelerator users run (`model.dtype=bfloat16`): every fgpair loss term (L_C, L_R, L_Cp, so
    Grad-CAM and the decoder too) finite and within bf16 rounding of the float32 step's, parameters
    and optimiser state kept in float32. The float32 step is the module's compiled one."""
    config, mesh, tx, float32_step = compiled
    bfloat16_config = config.copy_and_resolve_references()
    bfloat16_config.model.dtype = "bfloat16"
    bfloat16_step = step_lib.make_train_step(bfloat16_config, tx, mesh, steps_per_epoch=1000)
    batch = parallel.global_batch(batch_of(config, patterned_images(0, 8, 32), 0), mesh)
    _, reference = float32_step(fresh_state(config, mesh, tx), batch)
    state, metrics = bfloat16_step(fresh_state(bfloat16_config, mesh, tx), batch)
    dtypes = {leaf.dtype for leaf in jax.tree.leaves((state.params, state.opt_state))
              if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)}
    assert dtypes == {np.dtype("float32")}, dtypes
    reference, metrics = jax.device_get((reference, metrics))
    losses = [name for name in reference if name.startswith("loss")]
    assert {"loss_contrastive", "loss_reconstruction", "loss_pair"} <= set(losses)
    for name in losses:
        assert np.isfinite(metrics[name]), name
        np.testing.assert_allclose(metrics[name], reference[name], rtol=0.05, err_msg=name)


def test_keep_bn_stats_trains_the_weights_but_leaves_the_running_statistics(compiled):
    _, mesh, tx, _ = compiled
    config = tiny_config(method="moco", **{"model.keep_bn_stats": True})
    train_step = step_lib.make_train_step(config, tx, mesh, steps_per_epoch=1000)
    state = fresh_state(config, mesh, tx)
    batch = parallel.global_batch(batch_of(config, patterned_images(0, 8, config.data.image_size), 0), mesh)
    before = jax.device_get(state)  # the step donates its input state
    after, _ = train_step(state, batch)
    for field in ("batch_stats", "ema_batch_stats"):
        if field == "batch_stats":
            kept, start = after.batch_stats, before.batch_stats
        else:  # MoCo's own state holds the momentum encoder's statistics
            kept, start = after.method_state[field], before.method_state[field]
        for a, b in zip(leaves(kept), leaves(start)):
            np.testing.assert_array_equal(a, b, err_msg=field)
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(after.params), leaves(before.params)))
    assert int(after.step) == 1
