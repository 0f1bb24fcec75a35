"""LCR (methods/lcr.py) against a slow numpy reference of GANPerf/LCR's formulas (builder.py, main_moco.py).

The reference is written from the original PyTorch lines, in NCHW-free numpy on a tiny [N, h, w, D] map:
conv16 (1x1, no bias) -> bn16 (train mode: biased batch variance over N, h, w; eps 1e-5) -> relu ->
max over channels -> min-max over the batch; gradcam = relu(sum_c A * G); F.kl_div(p.log(), q,
reduction='sum') with softmax over the last axis.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fgpair_jax import contrastive, optim, state as state_lib
from fgpair_jax.data import augment
from fgpair_jax.errors import ConfigError
from fgpair_jax.methods import lcr, moco
from fgpair_jax import run_config


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def reference_attention(feature_map, weight, scale, bias, *, train, mean=None, var=None):
    """builder.py max_mask / inference: relu(bn16(conv16(A))) -> channel max -> batch min-max."""
    x = np.einsum("nhwd,dc->nhwc", feature_map, weight)
    if train:
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    x = np.maximum((x - mean) / np.sqrt(var + 1e-5) * scale + bias, 0.0)
    img = x.max(axis=-1)
    img = img - img.min()
    return img / (1e-7 + img.max())


def reference_kl(att_max, gradcam):
    """main_moco.py: F.kl_div(att_max.softmax(dim=-1).log(), gradcam.softmax(dim=-1), reduction='sum')."""
    log_p = np.log(softmax(att_max))
    q = softmax(gradcam)
    return float(np.sum(q * (np.log(q) - log_p)))


def reference_loss(feature_map, gradient, weight, scale, bias):
    """The KL of one per-GPU batch, every piece as the original computes it (float64)."""
    gradcam = np.maximum((feature_map * gradient).sum(axis=-1), 0.0)  # builder.py forward: gradcam
    return reference_kl(reference_attention(feature_map, weight, scale, bias, train=True), gradcam)


def branch_params(rng, dim, channels):
    k1, k2, k3 = jax.random.split(rng, 3)
    return {"conv": {"kernel": jax.random.normal(k1, (1, 1, dim, channels))},
            "bn": {"scale": 1.0 + 0.1 * jax.random.normal(k2, (channels,)),
                   "bias": 0.1 * jax.random.normal(k3, (channels,))}}


def jax_loss(feature_map, gradient, params, groups):
    """methods/lcr.py's KL for a feature map and a fixed dCE/dA, through its public pieces."""
    stats = {"attention": {"bn": {"mean": jnp.zeros(params["bn"]["scale"].shape),
                                  "var": jnp.ones(params["bn"]["scale"].shape)}}}
    config = tiny_config(method="lcr", **{"lcr.attention_channels": params["bn"]["scale"].shape[0],
                                          "model.bn_groups": groups})
    raw, _ = lcr.channel_max_attention({"attention": params}, stats, feature_map, config, train=True)
    return lcr.rowwise_kl(lcr.minmax_normalize(raw, groups), lcr.gradient_x_activation(feature_map, gradient), groups)


@pytest.mark.parametrize("groups", [1, 2])
def test_kl_matches_the_original_formulas_per_gpu_batch(groups):
    n, h, w, d, c = 4, 3, 5, 6, 4  # h != w: the softmax runs over the last (width) axis only
    rng = np.random.default_rng(0)
    feature_map = np.abs(rng.normal(size=(n, h, w, d)))  # post-ReLU, as a ResNet's layer4 output
    gradient = rng.normal(size=(n, h, w, d)) * 0.3
    params = jax.tree.map(np.asarray, branch_params(jax.random.key(0), d, c))
    weight = params["conv"]["kernel"][0, 0]
    # LCR: each GPU computes the sum over its own batch; DDP averages the GPUs' gradients.
    expected = np.mean([reference_loss(np.split(feature_map, groups)[g],
                                       np.split(gradient, groups)[g], weight, params["bn"]["scale"],
                                       params["bn"]["bias"]) for g in range(groups)])
    got = jax_loss(jnp.asarray(feature_map, jnp.float32), jnp.asarray(gradient, jnp.float32), params, groups)
    np.testing.assert_allclose(float(got), expected, rtol=1e-4)


def test_target_side_is_not_detached():
    """The gradient x activation target moves A too (the original never detaches featmap): d KL / dA
    matches central differences of the reference with dCE/dA held fixed, at entries where only the
    target depends on A strongly."""
    n, h, w, d, c = 2, 2, 3, 3, 2
    rng = np.random.default_rng(1)
    feature_map = np.abs(rng.normal(size=(n, h, w, d))) + 0.1
    gradient = rng.normal(size=(n, h, w, d))
    params = jax.tree.map(np.asarray, branch_params(jax.random.key(1), d, c))
    weight, scale, bias = params["conv"]["kernel"][0, 0], params["bn"]["scale"], params["bn"]["bias"]
    got = jax.grad(jax_loss)(jnp.asarray(feature_map, jnp.float32), jnp.asarray(gradient, jnp.float32), params, 1)
    eps = 1e-4
    for index in [(0, 0, 0, 0), (1, 1, 2, 2), (0, 1, 1, 1)]:
        plus, minus = feature_map.copy(), feature_map.copy()
        plus[index] += eps
        minus[index] -= eps
        numeric = (reference_loss(plus, gradient, weight, scale, bias)
                   - reference_loss(minus, gradient, weight, scale, bias)) / (2 * eps)
        np.testing.assert_allclose(float(got[index]), numeric, rtol=2e-2, atol=2e-4)
    # Without the attention branch's dependence, the target alone still gives A a gradient:
    target_only = jax.grad(lambda a: lcr.rowwise_kl(jnp.zeros((n, h, w)), lcr.gradient_x_activation(a, gradient), 1))(
        jnp.asarray(feature_map, jnp.float32))
    assert float(jnp.max(jnp.abs(target_only))) > 1e-3


@pytest.mark.parametrize("size", [64, 224])  # a 2x2 map, and the 7x7 map of LCR's 224 px (AvgPool2d(7))
def test_eval_features_match_inference(size):
    """builder.py inference(): running-statistics BN, channel max, min-max over the (per-GPU) evaluation
    batch, AvgPool2d over the map, L2 normalisation."""
    config = tiny_config(method="lcr", **{"data.image_size": size, "lcr.attention_channels": 4})
    params, stats, images = eval_setup(config, 4)
    assert lcr.per_gpu_batch(config) == 4  # tiny: batch 8 in 2 BN groups
    (feature_map, _), _ = moco.encode(params, stats, images, config, train=False)
    assert feature_map.shape[1:3] == ({64: (2, 2), 224: (7, 7)}[size])
    expected = reference_inference(np.asarray(feature_map, np.float64), params)
    np.testing.assert_allclose(np.asarray(lcr.eval_features(params, stats, images, config)), expected, rtol=1e-4, atol=1e-6)


def eval_setup(config, count):
    variables = jax.jit(lambda r: lcr.init_variables(r, config))(jax.random.key(0))
    params, stats = variables["params"], variables["batch_stats"]
    stats = dict(stats, attention={"bn": {"mean": jnp.full((4,), 0.05), "var": jnp.full((4,), 0.5)}})
    size = config.data.image_size
    images = augment.normalize(jnp.asarray(np.random.default_rng(0).integers(0, 256, (count, size, size, 3), np.uint8)))
    return params, stats, images


def reference_inference(a, params):
    att = reference_attention(a, np.asarray(params["attention"]["conv"]["kernel"][0, 0]),
                              np.asarray(params["attention"]["bn"]["scale"]), np.asarray(params["attention"]["bn"]["bias"]),
                              train=False, mean=0.05, var=0.5)
    pooled = (a * att[..., None]).mean(axis=(1, 2))
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def test_eval_min_max_runs_per_gpu_chunk_and_ignores_padding():
    config = tiny_config(method="lcr", **{"data.image_size": 64, "lcr.attention_channels": 4})
    params, stats, images = eval_setup(config, 8)
    whole = np.asarray(lcr.eval_features(params, stats, images, config))
    for chunk in (slice(0, 4), slice(4, 8)):  # two per-GPU chunks of 4, each normalised by itself
        np.testing.assert_allclose(whole[chunk], np.asarray(lcr.eval_features(params, stats, images[chunk], config)),
                                   rtol=1e-4, atol=1e-6)
    padded = images.at[6:].set(augment.normalize(jnp.zeros((2, 64, 64, 3), jnp.uint8)))  # the pipeline's padding
    valid = jnp.array([True] * 6 + [False] * 2)
    with_padding = np.asarray(lcr.eval_features(params, stats, padded, config, valid=valid))
    (feature_map, _), _ = moco.encode(params, stats, images[4:6], config, train=False)
    np.testing.assert_allclose(with_padding[4:6], reference_inference(np.asarray(feature_map, np.float64), params),
                               rtol=1e-4, atol=1e-6)
    per_image = run_config.override(config, {"lcr.eval_minmax": "image"})
    first = np.asarray(lcr.eval_features(params, stats, images[:1], per_image))
    np.testing.assert_allclose(np.asarray(lcr.eval_features(params, stats, images, per_image))[:1], first, rtol=1e-4, atol=1e-6)


@functools.lru_cache(maxsize=None)
def lcr_setup(groups):
    config = tiny_config(method="lcr", **{"data.image_size": 64, "model.bn_groups": groups})
    tx = optim.make_optimizer(config, steps_per_epoch=1000)
    state = state_lib.create_train_state(config, jax.random.key(0), tx, state_lib.method_sizes(config, None))
    rng = np.random.default_rng(0)
    shape = (config.global_batch_size, 64, 64, 3)
    view1, view2 = (augment.normalize(jnp.asarray(rng.integers(0, 256, shape, dtype=np.uint8))) for _ in range(2))
    return config, state, view1, view2


@pytest.mark.parametrize("groups", [1, 2])
def test_loss_uses_the_per_group_mean_gradient_and_sums_the_kl(groups):
    """lcr.loss end to end: dCE/dA is the gradient of each group's own mean InfoNCE (LCR's per-GPU CE),
    the KL is summed per group and averaged over groups, and L = L_C + nu * KL."""
    config, state, view1, view2 = lcr_setup(groups)
    total, aux = jax.jit(lambda p: lcr.loss(p, state, view1, view2, jax.random.key(1), config, epoch=0.0))(state.params)
    feature_map = aux["query"].feature_map
    frozen, keys, size = state.params, aux["keys"], config.global_batch_size // groups

    def group_ce(a, g):
        projection = moco.project(frozen, jnp.mean(a, axis=(1, 2)), config)
        return contrastive.info_nce(projection, keys[g * size:(g + 1) * size], state.method_state["queue"],
                                    config.moco.temperature)[0]

    gradient = jnp.concatenate([jax.grad(group_ce)(feature_map[g * size:(g + 1) * size], g) for g in range(groups)])
    # The branch's batch statistics per group, as the original's per-GPU bn16 in train mode.
    a = np.asarray(feature_map, np.float64)
    branch = jax.tree.map(np.asarray, state.params["attention"])
    expected = np.mean([reference_loss(np.split(a, groups)[g], np.split(np.asarray(gradient, np.float64), groups)[g],
                                       branch["conv"]["kernel"][0, 0], branch["bn"]["scale"], branch["bn"]["bias"])
                        for g in range(groups)])
    kl = float(aux["metrics"]["loss_attention_kl"])
    np.testing.assert_allclose(kl, expected, rtol=2e-4)
    if groups > 1:  # the check tells the global mean's gradient (1 / groups of the per-group one) apart
        wrong = np.mean([reference_loss(np.split(a, groups)[g], np.split(np.asarray(gradient, np.float64), groups)[g] / groups,
                                        branch["conv"]["kernel"][0, 0], branch["bn"]["scale"], branch["bn"]["bias"])
                         for g in range(groups)])
        assert abs(wrong - expected) > 3 * 2e-4 * abs(expected), (wrong, expected)
    np.testing.assert_allclose(float(total), float(aux["metrics"]["loss_contrastive"]) + 0.01 * kl, rtol=1e-6)
    assert set(aux["batch_stats"]) == {"encoder", "attention"}


@pytest.mark.slow
def test_the_kl_moves_the_encoder_through_the_target_side_too(monkeypatch):
    """In lcr.loss, the gradient x activation target is not detached (the original never detaches featmap):
    detaching it changes the KL's gradient on the encoder."""
    config, state, view1, view2 = lcr_setup(1)

    def encoder_gradient():
        def kl_only(params):
            return lcr.loss(params, state, view1, view2, jax.random.key(1), config, epoch=0.0)[1]["metrics"]["loss_attention_kl"]
        return jax.grad(kl_only)(state.params)

    attached = encoder_gradient()
    real = lcr.gradient_x_activation
    monkeypatch.setattr(lcr, "gradient_x_activation", lambda a, g: real(jax.lax.stop_gradient(a), g))
    detached = encoder_gradient()
    difference = optax_norm(jax.tree.map(jnp.subtract, attached["encoder"], detached["encoder"]))
    assert float(difference) > 0.01 * float(optax_norm(attached["encoder"])), (difference, optax_norm(attached["encoder"]))
    assert float(optax_norm(attached["attention"])) > 0


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_pre_port_runs_are_refused_in_one_line():
    old = run_config.migrate(run_config.override(tiny_config(method="lcr"), {}))
    with old.unlocked():
        del old.lcr["attention_channels"]
    migrated = run_config.migrate(old)
    with pytest.raises(ConfigError, match="pre-port LCR attention"):
        lcr.validate(migrated)
    for key, value in {"lcr.nu": -1.0, "lcr.attention_channels": -2, "lcr.eval_minmax": "channel",
                       "eval.batch_size": 6, "moco.symmetric": True}.items():
        with pytest.raises(ConfigError, match=f"config.{key}"):
            lcr.validate(tiny_config(method="lcr", **{key: value}))
