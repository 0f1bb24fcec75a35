"""Minimal reproduction of XLA:CPU's convolution cliffs, for the upstream report
(benchmarks/xla_cpu_conv_report.md). Needs only jax; no project code.

Times one 3x3, stride-1, padding-1 NHWC convolution (batch 64, float32) in three programs each (the
forward, the gradient with respect to the input, the gradient with respect to the kernel) at two
shapes per cliff, against the same convolution written as an im2col matrix product:
- 512 -> 512 channels on a 2x2 map vs a 3x3 map (ResNet-18's last stage at 64 vs 72 px images);
- 64 -> 64 channels on a 28x28 map vs an 18x18 map (its first stage at 112 vs 72 px).
A convolution with 2.25x fewer multiply-adds (2x2 vs 3x3 map) should not take longer at all.

    python benchmarks/xla_conv_repro.py
"""
import time

import jax
import jax.numpy as jnp
from jax import lax

BATCH, REPEATS = 64, 5


def xla_conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def im2col_conv(x, w):
    """The same convolution as [B, H, W, 9C] patches @ [9C, O]."""
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    height, width = x.shape[1:3]
    patches = jnp.concatenate([padded[:, i:i + height, j:j + width] for i in range(3) for j in range(3)], -1)
    return patches @ w.reshape(-1, w.shape[-1])


def milliseconds(fn, *args):
    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(*args))
    start = time.perf_counter()
    for _ in range(REPEATS):
        out = jitted(*args)
    jax.block_until_ready(out)
    return 1000 * (time.perf_counter() - start) / REPEATS


def main():
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, batch {BATCH}, float32, ms per call")
    print(f"{'map':>6} {'C->O':>9} {'impl':>7} {'forward':>9} {'input grad':>11} {'kernel grad':>12} {'GFLOP/s fwd':>12}")
    for size, channels in ((2, 512), (3, 512), (28, 64), (18, 64)):
        x = jax.random.normal(jax.random.key(0), (BATCH, size, size, channels))
        w = jax.random.normal(jax.random.key(1), (3, 3, channels, channels)) * 0.05
        dy = jnp.ones((BATCH, size, size, channels))
        gflop = 2 * BATCH * size * size * channels * channels * 9 / 1e9
        for name, conv in (("xla", xla_conv), ("im2col", im2col_conv)):
            forward = milliseconds(conv, x, w)
            input_grad = milliseconds(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy), x, w, dy)
            kernel_grad = milliseconds(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy), x, w, dy)
            print(f"{size:>4}x{size:<1} {channels:>4}->{channels:<4} {name:>7} {forward:>9.1f} {input_grad:>11.1f} "
                  f"{kernel_grad:>12.1f} {gflop / forward * 1000:>12.1f}")


if __name__ == "__main__":
    main()
