"""The im2col convolution (models/conv.py) against XLA's: values, both gradients, the modules built on it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fgpair_jax.models import build_encoder, conv as conv_lib
from conftest import tiny_config

# (input H, W, channels, features, kernel, strides, padding): ResNet's 3x3 (stride 1 and 2), its 1x1/2
# shortcut under flax's default "SAME", the 7x7/2 stem, "VALID", an odd size with a stride, the TF-"SAME"
# (0, 1) padding of EfficientNet's stem, a non-square input with unequal strides, and the 2x2 map of
# XLA's CPU cliff.
CASES = [(7, 7, 5, 6, 3, (1, 1), ((1, 1), (1, 1))), (8, 8, 5, 6, 3, (2, 2), ((1, 1), (1, 1))),
         (8, 8, 4, 6, 1, (2, 2), "SAME"), (13, 13, 3, 4, 7, (2, 2), ((3, 3), (3, 3))),
         (6, 6, 3, 4, 3, (1, 1), "VALID"), (9, 9, 3, 4, 3, (2, 2), "SAME"), (8, 8, 3, 4, 3, (2, 2), ((0, 1), (0, 1))),
         (9, 6, 3, 4, 3, (2, 1), ((1, 0), (1, 1))), (2, 2, 8, 8, 3, (1, 1), ((1, 1), (1, 1)))]


def xla_conv(x, kernel, strides, padding):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=conv_lib.NHWC_HWIO)


@pytest.mark.parametrize("height,width,channels,features,k,strides,padding", CASES)
def test_im2col_equals_xlas_convolution_and_its_gradients(height, width, channels, features, k, strides, padding):
    x = jax.random.normal(jax.random.key(0), (2, height, width, channels))
    kernel = jax.random.normal(jax.random.key(1), (k, k, channels, features))
    expected, expected_pullback = jax.vjp(lambda x, w: xla_conv(x, w, strides, padding), x, kernel)
    got, pullback = jax.vjp(lambda x, w: conv_lib.conv_im2col(x, w, strides, padding), x, kernel)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    cotangent = jax.random.normal(jax.random.key(2), expected.shape)
    for name, g, e in zip(("input", "kernel"), pullback(cotangent), expected_pullback(cotangent)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-4, err_msg=name)


def test_im2col_in_bfloat16_stays_bfloat16_and_close_to_xla():
    """flax casts inputs and kernel to the module's dtype first: bfloat16 on accelerators."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16)).astype(jnp.bfloat16)
    kernel = (jax.random.normal(jax.random.key(1), (3, 3, 16, 8)) * 0.1).astype(jnp.bfloat16)
    got = conv_lib.conv_im2col(x, kernel, (1, 1), ((1, 1), (1, 1)))
    expected = xla_conv(x.astype(jnp.float32), kernel.astype(jnp.float32), (1, 1), ((1, 1), (1, 1)))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), expected, rtol=0.05, atol=0.05)


def test_im2col_refuses_a_grouped_kernel_and_a_kernel_larger_than_the_input():
    with pytest.raises(ValueError, match="input has 4 channels, the kernel 2"):
        conv_lib.conv_im2col(jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 2, 4)), (1, 1), "SAME")
    with pytest.raises(ValueError, match="does not fit"):
        conv_lib.conv_im2col(jnp.ones((1, 2, 2, 4)), jnp.ones((3, 3, 4, 4)), (1, 1), "VALID")


def test_im2col_compiles_to_no_convolution_forward_or_backward():
    """The point of it: XLA:CPU's convolution kernels (and their cliffs) are never used."""
    x, kernel = jnp.ones((2, 6, 6, 4)), jnp.ones((3, 3, 4, 8))

    def loss(x, w):
        return conv_lib.conv_im2col(x, w, (2, 2), ((1, 1), (1, 1))).sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).as_text()
    assert "convolution" not in text and "dot_general" in text
    assert "convolution" in jax.jit(jax.grad(lambda x, w: xla_conv(x, w, (2, 2), ((1, 1), (1, 1))).sum(),
                                             argnums=(0, 1))).lower(x, kernel).as_text()


def test_flax_conv_takes_it_and_falls_back_to_xla_where_it_does_not_apply():
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))
    outputs = {}
    for impl in ("xla", "im2col"):
        hook = conv_lib.conv_general_dilated(impl)
        dense = nn.Conv(6, (3, 3), (2, 2), padding=((1, 1), (1, 1)), conv_general_dilated=hook)
        grouped = nn.Conv(4, (3, 3), feature_group_count=2, conv_general_dilated=hook)  # XLA's: groups
        dilated = nn.Conv(4, (3, 3), kernel_dilation=(2, 2), conv_general_dilated=hook)  # XLA's: dilation
        one_d = nn.Conv(4, (3,), conv_general_dilated=hook)  # XLA's: 1-D
        inputs = (x, x, x, x[:, 0])
        modules = (dense, grouped, dilated, one_d)
        params = [m.init(jax.random.key(1), i) for m, i in zip(modules, inputs)]
        outputs[impl] = [m.apply(p, i) for m, p, i in zip(modules, params, inputs)]
    for got, expected in zip(outputs["im2col"], outputs["xla"]):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # lax's own default dimension numbers (None) are NCHW / OIHW: XLA's convolution, not im2col's NHWC.
    nchw, oihw = jnp.moveaxis(x, -1, 1), jax.random.normal(jax.random.key(2), (6, 4, 3, 3))
    np.testing.assert_allclose(
        conv_lib.conv_general_dilated("im2col")(nchw, oihw, (1, 1), "SAME"),
        jax.lax.conv_general_dilated(nchw, oihw, (1, 1), "SAME"), rtol=1e-5, atol=1e-5)


def test_auto_is_im2col_on_cpu_and_a_bad_name_is_refused(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert conv_lib.resolve_conv_impl("auto") == "im2col"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert conv_lib.resolve_conv_impl("auto") == "xla"
    assert conv_lib.conv_general_dilated("auto") is jax.lax.conv_general_dilated
    assert conv_lib.resolve_conv_impl("im2col") == "im2col"
    with pytest.raises(ValueError, match="conv_impl='winograd' is not one of"):
        conv_lib.resolve_conv_impl("winograd")


def test_an_encoder_gives_the_same_features_and_parameters_under_either_impl():
    """Same parameter tree (a checkpoint loads into either), same features and gradients to float noise."""
    images = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3))
    results = {}
    for impl in ("xla", "im2col"):
        encoder = build_encoder(tiny_config(**{"model.conv_impl": impl}).model)
        variables = jax.jit(lambda r: encoder.init(r, images, train=False))(jax.random.key(1))

        def loss(params):
            (_, pooled), _ = encoder.apply({**variables, "params": params}, images, train=True,
                                           mutable=["batch_stats"])
            return (pooled ** 2).sum(), pooled
        (_, pooled), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
        results[impl] = (jax.tree.map(jnp.shape, variables), pooled, grads)
    assert results["im2col"][0] == results["xla"][0]
    np.testing.assert_allclose(results["im2col"][1], results["xla"][1], rtol=1e-4, atol=1e-5)
    # Train-mode BN over 4 images amplifies summation-order noise, and some leaves' true gradient is ~0
    # (a conv feeding BN): compare the whole gradient vector by its norm.
    got, expected = (jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(results[impl][2])])
                     for impl in ("im2col", "xla"))
    assert jnp.linalg.norm(got - expected) <= 1e-4 * jnp.linalg.norm(expected)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_each_encoder_uses_the_configured_impl_for_every_dense_convolution(name):
    """The knob reaches every dense convolution: under im2col the lowered training forward and backward
    hold no convolution at all (Lite0's depthwise ones `shifted`), under xla they do."""
    images = jnp.zeros((2, 64, 64, 3))
    for impl, convolutions in (("im2col", False), ("xla", True)):
        config = tiny_config(**{"model.name": name, "model.conv_impl": impl, "model.depthwise_impl": "shifted"})
        encoder = build_encoder(config.model)
        variables = jax.eval_shape(lambda r: encoder.init(r, images, train=False), jax.random.key(0))

        def loss(params, batch_stats):
            (_, pooled), _ = encoder.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                           mutable=["batch_stats"])
            return pooled.sum()
        text = jax.jit(jax.grad(loss)).lower(variables["params"], variables["batch_stats"]).as_text()
        assert ("convolution" in text) == convolutions, (name, impl)
