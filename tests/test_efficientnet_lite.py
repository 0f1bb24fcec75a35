"""EfficientNet-Lite0: TF padding, the two depthwise implementations, shapes, frozen stages, registry."""
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fgpair_jax.models import build_encoder, feature_dim
from fgpair_jax.models import efficientnet_lite as lite

# Parameters of the torch port's EfficientNet-Lite0 (4,652,008) minus its 1280x1000 classifier.
LITE0_TRUNK_PARAMS = 4_652_008 - 1_281_000
# Short trunks with the block kinds that matter (no expansion, skip, k3/k5, stride 1/2): compiling the
# full Lite0 with gradients takes ~1 min on 2 cores, these a few seconds. Full Lite0 numerics are
# checked against torch in test_pretrained.py.
TWO_STAGES = ((1, 3, 1, 1, 16), (1, 5, 2, 6, 24))
THREE_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (1, 5, 2, 6, 40))


def random_variables(model, image_shape, seed=0):
    """Variables with the model's shapes filled from numpy: no compiled init (~7 s for a jitted one)."""
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                            jax.ShapeDtypeStruct(image_shape, jnp.float32))
    rng = np.random.RandomState(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
        if name == "scale":
            return jnp.asarray(1 + 0.1 * rng.randn(*leaf.shape), jnp.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 10
        return jnp.asarray(rng.randn(*leaf.shape) / np.sqrt(fan_in), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def numpy_depthwise(x, kernel, stride, padding):
    """Slow reference: explicit loops over output pixels, NHWC, kernel [k, k, 1, C]."""
    x = np.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    k = kernel.shape[0]
    out_h, out_w = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]), np.float64)
    for r, c in itertools.product(range(out_h), range(out_w)):
        window = x[:, r * stride:r * stride + k, c * stride:c * stride + k, :]
        out[:, r, c, :] = np.einsum("bijc,ijc->bc", window, kernel[:, :, 0, :])
    return out


@pytest.mark.parametrize("size,kernel,stride,expected", [
    (224, 3, 2, (0, 1)), (224, 5, 2, (1, 2)), (7, 3, 2, (1, 1)), (14, 5, 1, (2, 2)), (1, 3, 2, (1, 1)),
])
def test_same_padding_is_tf_same(size, kernel, stride, expected):
    assert lite.same_padding(size, kernel, stride) == expected
    assert tuple(jax.lax.padtype_to_pads((size,), (kernel,), (stride,), "SAME")[0]) == expected


@pytest.mark.parametrize("kernel,stride,size", [(3, 1, 9), (3, 2, 10), (5, 2, 9)])
def test_shifted_and_conv_match_reference_and_each_other(kernel, stride, size):
    rng = np.random.RandomState(kernel * 10 + stride)
    x = rng.randn(2, size, size, 6).astype(np.float32)
    w = rng.randn(kernel, kernel, 1, 6).astype(np.float32)
    pads = (lite.same_padding(size, kernel, stride),) * 2
    reference = numpy_depthwise(x.astype(np.float64), w.astype(np.float64), stride, pads)
    cotangent = rng.randn(*reference.shape).astype(np.float32)
    results = {}
    for name, fn in (("shifted", lite.depthwise_conv_shifted), ("conv", lite.depthwise_conv_native)):

        @jax.jit
        def forward_and_backward(a, b, g):
            out, vjp = jax.vjp(lambda a, b: fn(a, b, stride, pads), a, b)  # noqa: B023 (traced at once)
            return out, vjp(g)

        out, results[name] = forward_and_backward(x, w, cotangent)
        np.testing.assert_allclose(out, reference, atol=1e-5, rtol=1e-5)
    for grad_shifted, grad_conv in zip(results["shifted"], results["conv"]):
        np.testing.assert_allclose(grad_shifted, grad_conv, atol=1e-5, rtol=1e-5)


def test_whole_model_same_outputs_and_gradients_with_both_impls():
    images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
    variables = random_variables(lite.EfficientNetLite(TWO_STAGES), images.shape)

    def loss_and_grad(impl):
        model = lite.EfficientNetLite(TWO_STAGES, depthwise_impl=impl)
        loss = lambda p: jnp.sum(jnp.sin(model.apply({**variables, "params": p}, images, train=False)[1]))
        return jax.jit(jax.value_and_grad(loss))(variables["params"])

    (loss_s, grad_s), (loss_c, grad_c) = loss_and_grad("shifted"), loss_and_grad("conv")
    np.testing.assert_allclose(loss_s, loss_c, rtol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grad_c))
    for a, b in zip(jax.tree_util.tree_leaves(grad_s), jax.tree_util.tree_leaves(grad_c)):
        np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=1e-4)


def test_outputs_shapes_dtypes_and_parameter_count():
    model = lite.EfficientNetLite0(num_classes=10, dtype=jnp.bfloat16)
    images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
    feature_map, pooled, logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=True,
                                                                          mutable=["batch_stats"])[0],
                                                 variables, images)
    assert feature_map.shape == (2, 2, 2, 1280) and feature_map.dtype == jnp.float32
    assert pooled.shape == (2, 1280) and logits.shape == (2, 10)
    assert variables["params"]["blocks_15"]["depthwise_conv"]["kernel"].shape == (3, 3, 1, 1152)
    assert variables["params"]["blocks_15"]["depthwise_conv"]["kernel"].dtype == jnp.float32
    trunk = {k: v for k, v in variables["params"].items() if k != "fc"}
    assert sum(x.size for x in jax.tree_util.tree_leaves(trunk)) == LITE0_TRUNK_PARAMS
    assert "expand_conv" not in variables["params"]["blocks_0"]  # expand ratio 1 in stage 1
    assert sorted(k for k in variables["params"] if k.startswith("blocks_")) == sorted(
        f"blocks_{i}" for i in range(16))


def test_frozen_stages_get_no_gradient_and_keep_statistics():
    # stem + stages 1-2 = blocks 0..2; "conv" compiles faster and freezing does not depend on it.
    model = lite.EfficientNetLite(THREE_STAGES, frozen_stages=2, depthwise_impl="conv")
    images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
    variables = random_variables(model, images.shape)

    def loss(params):
        (_, pooled), updates = model.apply({**variables, "params": params}, images, train=True,
                                           mutable=["batch_stats"])
        return jnp.sum(pooled), updates["batch_stats"]

    grads, stats = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    for name in ("conv_stem", "bn0", "blocks_0", "blocks_1", "blocks_2"):
        assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grads[name])), name
        for new, old in zip(jax.tree_util.tree_leaves(stats.get(name, {})),
                            jax.tree_util.tree_leaves(variables["batch_stats"].get(name, {}))):
            np.testing.assert_array_equal(new, old)
    assert float(jnp.abs(grads["conv_head"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["blocks_3"]["depthwise_conv"]["kernel"]).max()) > 0
    trained_mean = variables["batch_stats"]["blocks_3"]["bn1"]["mean"]
    assert not np.allclose(stats["blocks_3"]["bn1"]["mean"], trained_mean)


@pytest.mark.parametrize("kwargs,message", [
    ({"depthwise_impl": "fft"}, "depthwise_impl='fft' is not one of"),
    ({"frozen_stages": 8}, "frozen_stages=8 must be in [0, 7]"),
])
def test_bad_knobs_fail_with_clear_message(kwargs, message):
    with pytest.raises(ValueError) as error:
        lite.EfficientNetLite0(**kwargs).init(jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 3)), train=False)
    assert message in str(error.value)


def test_auto_impl_follows_backend():
    expected = "shifted" if jax.default_backend() == "cpu" else "conv"
    assert lite.resolve_depthwise_impl("auto") == expected
    assert lite.resolve_depthwise_impl("conv") == "conv"


def test_registry_builds_lite0_with_config_knobs():
    config = ml_collections.ConfigDict({"name": "efficientnet_lite0", "bn_groups": 2, "dtype": "bfloat16",
                                        "depthwise_impl": "conv", "frozen_stages": 3})
    model = build_encoder(config)
    assert isinstance(model, lite.EfficientNetLite)
    assert (model.bn_groups, model.dtype, model.depthwise_impl, model.frozen_stages) == (2, jnp.bfloat16,
                                                                                          "conv", 3)
    assert feature_dim(config) == 1280 == model.feature_dim
    minimal = build_encoder(ml_collections.ConfigDict({"name": "efficientnet_lite0", "bn_groups": 1}))
    assert (minimal.depthwise_impl, minimal.frozen_stages, minimal.num_classes) == ("auto", 0, 0)
