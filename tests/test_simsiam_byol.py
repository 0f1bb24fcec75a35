"""SimSiam and BYOL (methods/simsiam.py, methods/byol.py) against slow numpy references of their papers'
and reference code's formulas; collapse; global-batch BN; fgpair on a negative-free base; old checkpoints."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fgpair_jax import checkpointing, optim, parallel, run, state as state_lib, step as step_lib
from fgpair_jax.errors import ConfigError
from fgpair_jax.methods import byol, fgpair, simsiam
from fgpair_jax.models.heads import BottleneckPredictor, SimSiamProjector
from fgpair_jax import run_config


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_simsiam_loss(p1, z1, p2, z2):
    """main_simsiam.py: -(CosineSimilarity(p1, z2).mean() + CosineSimilarity(p2, z1).mean()) * 0.5, row by row."""
    cos = lambda a, b: np.mean([a[i] @ b[i] / (np.linalg.norm(a[i]) * np.linalg.norm(b[i])) for i in range(len(a))])  # noqa: E731
    return -(cos(p1, z2) + cos(p2, z1)) * 0.5


def numpy_byol_loss(p1, p2, t1, t2):
    """BYOL Eq. 2: ||p/|p| - z'/|z'| ||^2 per image, batch mean, both views' terms summed."""
    term = lambda p, t: np.mean([np.sum((unit(p[i]) - unit(t[i])) ** 2) for i in range(len(p))])  # noqa: E731
    return term(p1, t2) + term(p2, t1)


def test_losses_match_numpy_references_and_stop_the_target_gradient():
    rng = np.random.default_rng(0)
    p1, z1, p2, z2 = (rng.normal(size=(6, 5)) for _ in range(4))
    got = simsiam.symmetric_loss(*(jnp.asarray(a, jnp.float32) for a in (p1, z1, p2, z2)))
    np.testing.assert_allclose(float(got), numpy_simsiam_loss(p1, z1, p2, z2), rtol=1e-5)
    got = byol.symmetric_loss(*(jnp.asarray(a, jnp.float32) for a in (p1, p2, z1, z2)))
    np.testing.assert_allclose(float(got), numpy_byol_loss(p1, p2, z1, z2), rtol=1e-5)
    # 2 - 2 cos: the regression loss is 2 - 2 x the cosine SimSiam's D negates.
    np.testing.assert_allclose(float(byol.regression_loss(p1, z2)), 2 + 2 * float(simsiam.negative_cosine(p1, z2)),
                               rtol=1e-5)
    for loss in (lambda z: simsiam.symmetric_loss(p1, z, p2, z2), lambda z: byol.symmetric_loss(p1, p2, z, z2)):
        assert float(jnp.abs(jax.grad(loss)(jnp.asarray(z1, jnp.float32))).max()) == 0.0  # sg(z)
    assert float(jnp.abs(jax.grad(lambda p: simsiam.symmetric_loss(p, z1, p2, z2))(p1)).max()) > 0


def numpy_batch_norm(x, scale=None, bias=None):
    """torch BatchNorm1d in training mode: biased variance over the (whole) batch, eps 1e-5."""
    y = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    return y if scale is None else y * scale + bias


def test_heads_match_the_reference_architectures():
    """builder.py's projector (Linear-BN-ReLU x2, Linear-BN(affine=False)) and predictor (Linear-BN-ReLU-Linear),
    BN statistics of the batch, in numpy."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 6)).astype(np.float32)
    module = SimSiamProjector(hidden_dim=7, out_dim=5)
    variables = module.init(jax.random.key(0), x, train=False)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64) + rng.normal(size=a.shape) * 0.1, variables["params"])
    got, _ = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                          mutable=["batch_stats"])
    h = x.astype(np.float64)
    for i in (1, 2):
        bn = params[f"bn{i}"]
        h = np.maximum(numpy_batch_norm(h @ params[f"fc{i}"]["kernel"], bn["scale"], bn["bias"]), 0)
    assert "bias" not in params["fc3"] and "bn3" not in params  # no affine in the last BN
    np.testing.assert_allclose(np.asarray(got), numpy_batch_norm(h @ params["fc3"]["kernel"]), rtol=1e-4, atol=1e-4)

    module = BottleneckPredictor(hidden_dim=3, out_dim=5)
    variables = module.init(jax.random.key(1), x[:, :5], train=False)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64) + rng.normal(size=a.shape) * 0.1, variables["params"])
    got, _ = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x[:, :5], train=True,
                          mutable=["batch_stats"])
    assert "bias" not in params["fc1"]  # SimSiam's predictor: no bias before BN
    hidden = np.maximum(numpy_batch_norm(x[:, :5] @ params["fc1"]["kernel"], params["bn1"]["scale"],
                                         params["bn1"]["bias"]), 0)
    np.testing.assert_allclose(np.asarray(got), hidden @ params["fc2"]["kernel"] + params["fc2"]["bias"],
                               rtol=1e-4, atol=1e-4)


def test_byol_target_momentum_follows_the_cosine_schedule():
    total = 10
    got = [float(byol.target_momentum(0.996, k, total)) for k in (0, 5, 10, 20)]
    expected = [1 - (1 - 0.996) * (np.cos(np.pi * min(k, total) / total) + 1) / 2 for k in (0, 5, 10, 20)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[0] == pytest.approx(0.996) and got[2] == pytest.approx(1.0)


def make_state(config, mesh=None):
    tx = optim.make_optimizer(config, steps_per_epoch=10)
    state = state_lib.create_train_state(config, jax.random.key(0), tx, state_lib.method_sizes(config, 18))
    return (jax.device_put(state, parallel.replicated(mesh)) if mesh is not None else state), tx


def patterned_batch(config, seed):
    grids = np.random.default_rng(seed).integers(0, 256, (config.global_batch_size, 4, 4, 3), dtype=np.uint8)
    size = config.data.image_size
    images = np.repeat(np.repeat(grids, size // 4, axis=1), size // 4, axis=2)
    return {"view1": images, "view2": images}


def test_simsiam_state_holds_no_queue_and_byol_only_its_target_network():
    simsiam_state, _ = make_state(tiny_config(method="simsiam"))
    assert simsiam_state.method_state == {}
    assert set(simsiam_state.params) == {"encoder", "projector", "predictor"}
    byol_state, _ = make_state(tiny_config(method="byol"))
    assert set(byol_state.method_state) == {"target_params", "target_batch_stats"}
    assert set(byol_state.method_state["target_params"]) == {"encoder", "projector"}  # no target predictor
    on_simsiam, _ = make_state(tiny_config(method="fgpair", **{"fgpair.base": "simsiam"}))
    assert set(on_simsiam.method_state) == {"feature_variance", "variance_initialized"}


def test_a_simsiam_state_round_trips_through_a_checkpoint(tmp_path):
    """A state whose method_state is empty (no queue, no momentum encoder) saves and restores leaf for
    leaf, and the restored checkpoint holds SimSiam's predictor."""
    config = tiny_config(method="simsiam")
    state, tx = make_state(config)
    state = state.replace(step=jnp.asarray(3, jnp.int32))
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "ckpt"), 2, checkpointing.fingerprint(config, state))
    checkpointer.save(3, state, {"next_index": 3})
    checkpointer.close()
    reopened = checkpointing.Checkpointer(str(tmp_path / "ckpt"), 2, checkpointing.fingerprint(config, state))
    restored = reopened.restore(make_state(config)[0])
    reopened.close()
    assert int(restored.step) == 3 and restored.method_state == {} and "predictor" in restored.params
    for want, got in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(want), np.asarray(got))


def test_simsiam_ignores_bn_groups_its_statistics_are_the_global_batchs():
    """SimSiam's SyncBN: the step is the same whatever `model.bn_groups` (MoCo's per-GPU groups) says."""
    mesh = parallel.make_mesh()
    results = []
    for groups in (1, 4):
        config = tiny_config(method="simsiam", **{"model.bn_groups": groups})
        state, tx = make_state(config, mesh)
        train_step = step_lib.make_train_step(config, tx, mesh, steps_per_epoch=10)
        state, metrics = train_step(state, parallel.global_batch(patterned_batch(config, 0), mesh))
        results.append(jax.device_get((state.batch_stats, metrics["loss"])))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_array_equal(a, b)


def test_simsiam_does_not_collapse_on_tiny_data():
    """SimSiam Sec. 4.1: the std of the l2-normalised output per dimension stays near 1/sqrt(d) when it
    learns and falls to 0 when it collapses. 24 steps on 48 coloured grids."""
    config = tiny_config(method="simsiam", **{"optim.learning_rate": 0.05, "augment.hue": 0.0,
                                              "augment.saturation": 0.0, "augment.grayscale_prob": 0.0})
    mesh = parallel.make_mesh()
    state, tx = make_state(config, mesh)
    train_step = step_lib.make_train_step(config, tx, mesh, steps_per_epoch=1000)
    stds, losses = [], []
    for index in range(24):
        state, metrics = train_step(state, parallel.global_batch(patterned_batch(config, index % 6), mesh))
        stds.append(float(metrics["output_std"]))
        losses.append(float(metrics["loss"]))
    dim = simsiam.widths(config)[1]
    assert np.all(np.isfinite(losses)) and np.mean(losses[-6:]) < np.mean(losses[:6]), losses
    assert min(stds[-6:]) > 0.3 / np.sqrt(dim), (stds, dim)


@functools.lru_cache(maxsize=None)
def fgpair_gradients(base, epoch):
    config = tiny_config(method="fgpair", **{"fgpair.base": base, "fgpair.warmup_epochs": 2, "fgpair.ramp_epochs": 0,
                                             "global_batch_size": 8})
    state, _ = make_state(config)
    rng = np.random.default_rng(0)
    shape = (8, config.data.image_size, config.data.image_size, 3)
    view1, view2 = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2))

    def loss_fn(params, state, view1, view2, epoch):
        return fgpair.loss(params, state, view1, view2, jax.random.key(1), config, epoch=epoch)

    # Everything an argument, nothing a constant: the two epochs of a test are one program, compiled once
    # (the second call reads the test session's compilation cache).
    (_, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params, state, view1, view2,
                                                                         jnp.float32(epoch))
    return config, state, (view1, view2), grads, aux


@pytest.mark.slow
@pytest.mark.parametrize("base", ["simsiam", "byol"])
def test_fgpair_pair_term_is_the_bases_own_loss_on_the_pair(base):
    config, state, (view1, _), grads, aux = fgpair_gradients(base, 5.0)
    module = fgpair.BASES[base]
    assert "loss_ssl" in aux["metrics"] and "pair_accuracy" not in aux["metrics"]
    # L_Cp on a pair (x_a, x_b) is the base's own two-view loss with x_a and x_b as the views (BN statistic
    # updates discarded). Well-conditioned random images: an untrained decoder's renderings are nearly one
    # image, whose batch statistics would amplify float rounding.
    image_a, image_b = (jnp.asarray(np.random.default_rng(seed).normal(size=view1.shape), jnp.float32)
                        for seed in (5, 6))
    pair, _ = jax.jit(lambda a, b: fgpair.synthesized_pair_loss(state.params, state, a, b, jax.random.key(2),
                                                                config))(image_a, image_b)
    own, _ = jax.jit(lambda a, b: module.ssl_loss(state.params, state, a, b, jax.random.key(2), config))(image_a,
                                                                                                       image_b)
    np.testing.assert_allclose(float(pair), float(own), rtol=1e-5)
    swapped, _ = jax.jit(lambda a, b: module.ssl_loss(state.params, state, a, b, jax.random.key(2), config))(
        image_a, jnp.roll(image_b, 1, axis=0))
    assert abs(float(swapped) - float(own)) > 1e-4  # the pairing matters: the check can fail
    _, _, _, grads_before, _ = fgpair_gradients(base, 1.0)  # during the warm-up L_Cp has weight 0
    difference = sum(float(jnp.sum(jnp.square(a - b))) for a, b in zip(jax.tree.leaves(grads["encoder"]),
                                                                          jax.tree.leaves(grads_before["encoder"])))
    assert difference > 0  # and after it, L_Cp reaches the encoder


def test_unknown_base_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"config.fgpair.base='simclr': use one of \('moco', 'simsiam', 'byol'\)"):
        run_config.validate(tiny_config(method="fgpair", **{"fgpair.base": "simclr"}))
    with pytest.raises(ConfigError, match="config.byol.base_momentum=1.5"):
        run_config.validate(tiny_config(method="byol", **{"byol.base_momentum": 1.5}))


def legacy_workdir(tmp_path, config, mesh, steps=2):
    """A checkpoint as the code before issue 24 wrote it: `LegacyTrainState` (queue, momentum encoder and
    extras as fields), checkpoint format 2, a training config without the keys added since."""
    run_plan = run.plan(config, 18, mesh)
    state = run.fresh_state(config, str(tmp_path), run_plan, mesh)
    train_step = step_lib.make_train_step(config, run_plan.tx, mesh, run_plan.steps_per_epoch)
    for index in range(steps):
        state, _ = train_step(state, parallel.global_batch(patterned_batch(config, index), mesh))
    legacy = state_lib.legacy_layout(config).template(state)
    fingerprint = checkpointing.fingerprint(config, legacy, checkpointing.LEGACY_FORMAT)
    new_keys = ("fgpair.base", "simsiam.", "byol.")
    fingerprint["training_config"] = {k: v for k, v in fingerprint["training_config"].items()
                                      if not k.startswith(new_keys)}
    writer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), 3, fingerprint)
    writer.save(steps, legacy, {"next_index": steps})
    writer.close()
    return state, run_plan


@pytest.mark.parametrize("method", ["moco", "fgpair"])
def test_a_checkpoint_of_the_old_layout_restores_into_the_methods_state(tmp_path, method):
    config = tiny_config(method=method)
    mesh = parallel.make_mesh()
    saved, run_plan = legacy_workdir(tmp_path, config, mesh)
    saved = jax.device_get(saved)
    checkpointer = run.open_checkpoints(config, str(tmp_path), run_plan)
    restored, data = run.restore_or_start(config, str(tmp_path), run_plan, mesh, checkpointer)
    checkpointer.close()
    assert data == {"next_index": 2} and int(restored.step) == 2
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)
    if method == "fgpair":
        assert bool(restored.method_state["variance_initialized"]) == bool(saved.method_state["variance_initialized"])


def test_an_old_layout_checkpoint_under_a_new_method_is_refused_in_one_line(tmp_path):
    mesh = parallel.make_mesh()
    legacy_workdir(tmp_path, tiny_config(method="moco"), mesh, steps=0)
    config = tiny_config(method="simsiam")
    run_plan = run.plan(config, 18, mesh)
    checkpointer = run.open_checkpoints(config, str(tmp_path), run_plan)
    with pytest.raises(checkpointing.CheckpointMismatchError) as raised:
        run.restore_or_start(config, str(tmp_path), run_plan, mesh, checkpointer)
    checkpointer.close()
    message = str(raised.value)
    assert "\n" not in message and "method is 'moco' in the checkpoint but 'simsiam' in the config" in message
    assert os.listdir(tmp_path / "checkpoints") == ["0"]
