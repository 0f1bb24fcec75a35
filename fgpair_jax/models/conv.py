"""The encoders' dense convolutions, through XLA's convolution or as a matrix product of patches.

XLA's CPU convolutions leave their fast path at some shapes: a 3x3 convolution with 512 channels on a
2x2 map (ResNet-18's last stage at 56-64 px) and the kernel gradient of a 64-channel 3x3 at 28x28 (its
first stage at 112 px) run an order of magnitude slower than the same layers one size up or down
(`benchmarks/conv_sweep.py`, `benchmarks/xla_conv_repro.py`; numbers in results/README.md, issue 27).
`im2col` writes a k x k convolution as the product of its patches with the reshaped kernel: the k*k
strided windows of the padded input, concatenated on the channel axis ([B, h, w, k*k*C]), times the
kernel as a [k*k*C, O] matrix. That is one dot, which XLA:CPU runs at its matrix-multiply rate at every
shape, and autodiff turns windows and a dot into pads, adds and dots: no convolution anywhere, forward
or backward. The price is memory: the patches are k*k times the input and are kept for the backward
pass. So `auto` (`resolve_conv_impl`) takes `im2col` on the CPU backend and XLA's convolution on GPU/TPU,
whose convolutions have no such cliff and whose memory is scarcer. Parameters are the same either way
(flax `nn.Conv`'s HWIO kernel): a checkpoint trained with one impl loads into the other, and the two
compute the same numbers up to float rounding (summation order), so a resume is bit-identical only
under the same impl. The decoder's and LCR's attention convolutions stay XLA's.
"""
from typing import Callable, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "xla", "im2col")
NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def resolve_conv_impl(impl: str) -> str:
    """`auto` -> `im2col` on the CPU backend, `xla` elsewhere; `xla` and `im2col` as given.

    Raises:
      ValueError: `impl` not in CONV_IMPLS.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={impl!r} is not one of {CONV_IMPLS}.")
    if impl == "auto":
        return "im2col" if jax.default_backend() == "cpu" else "xla"
    return impl


def conv_im2col(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                padding: Union[str, Sequence[Tuple[int, int]]]) -> jax.Array:
    """A dense 2-D convolution as patches @ kernel (module docstring); what `lax.conv_general_dilated`
    computes for NHWC inputs and HWIO kernels without dilation or groups.

    Args:
      x: [B, H, W, C] input.
      kernel: [kh, kw, C, O] (HWIO, flax's layout).
      strides: (sh, sw).
      padding: "SAME", "VALID" or ((top, bottom), (left, right)) in pixels.

    Returns:
      [B, h, w, O], h = (H + top + bottom - kh) // sh + 1 (and w likewise), in the dtype of `x @ kernel`.

    Raises:
      ValueError: the kernel's input channels are not x's (a grouped kernel), or the padded input is
        smaller than the kernel.
    """
    kh, kw, channels, features = kernel.shape
    if x.shape[-1] != channels:
        raise ValueError(f"conv_im2col: input has {x.shape[-1]} channels, the kernel {channels} "
                         "(grouped convolutions are XLA's: conv_impl='xla').")
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, padding)
    (top, bottom), (left, right) = padding
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h = (padded.shape[1] - kh) // strides[0] + 1
    out_w = (padded.shape[2] - kw) // strides[1] + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"conv_im2col: a {kh}x{kw} kernel does not fit the padded {padded.shape[1:3]} input.")
    windows = [lax.slice(padded, (0, i, j, 0),
                         (x.shape[0], i + (out_h - 1) * strides[0] + 1, j + (out_w - 1) * strides[1] + 1, channels),
                         (1, strides[0], strides[1], 1))
               for i in range(kh) for j in range(kw)]
    patches = windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)
    # Tap (i, j), channel c sits at (i * kw + j) * C + c: the row-major order of HWIO's first three axes.
    return jnp.dot(patches, kernel.reshape(kh * kw * channels, features))


def _im2col_or_xla(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                   preferred_element_type=None):
    """`lax.conv_general_dilated`'s signature (flax `nn.Conv(conv_general_dilated=...)`): `conv_im2col`
    for what it covers (2-D, NHWC/HWIO dimension numbers given, as flax gives them; no dilation or
    groups; default precision), XLA's convolution for anything else (lax's default dimension numbers,
    None, mean NCHW)."""
    dilated = any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    covered = (lhs.ndim == 4 and dimension_numbers is not None and not dilated and feature_group_count == 1
               and batch_group_count == 1 and precision is None and preferred_element_type is None)
    if covered and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == \
            lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC_HWIO):
        return conv_im2col(lhs, rhs, tuple(window_strides), padding)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count, precision,
                                    preferred_element_type)


def conv_general_dilated(impl: str) -> Callable:
    """The function flax `nn.Conv(conv_general_dilated=...)` should call for `impl` (CONV_IMPLS):
    `lax.conv_general_dilated` for `xla`, the im2col product for `im2col`; `auto` is resolved by
    `resolve_conv_impl` when the module is traced, from `jax.default_backend()`.

    Raises:
      ValueError: `impl` not in CONV_IMPLS.
    """
    return _im2col_or_xla if resolve_conv_impl(impl) == "im2col" else lax.conv_general_dilated

