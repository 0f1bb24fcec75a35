"""Which of ResNet-18's convolutions leaves XLA's fast CPU path at some image sizes (issue 27.2).

`peer_step.py` found plain ResNet-18 forward + backward far slower at some image sizes than at their
neighbours on XLA's CPU backend, where torch slows smoothly with size (results/README.md). This times each distinct convolution of
ResNet-18 alone (NHWC, float32, batch 64, `lax.conv_general_dilated` as flax's `nn.Conv` calls it):
forward + the gradients with respect to its input and its kernel, jitted, at the spatial size that
layer sees for each image size. Milliseconds per call, and each convolution's share of the sum.

    python benchmarks/conv_sweep.py --sizes=64,72,96,112 --out=results/bench/conv_sweep.json
    python benchmarks/conv_sweep.py --sizes=64,72,112 --split --out=results/bench/conv_sweep_split.json
    python benchmarks/conv_sweep.py --impl=im2col --sizes=64,72,96,112 --out=results/bench/conv_sweep_im2col.json

`--impl=im2col` times the same convolutions as the patches @ kernel product the encoders use on CPU
(`config.model.conv_impl`, fgpair_jax/models/conv.py).
"""
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

_SIZES = flags.DEFINE_list("sizes", ["64", "72", "96", "112"], "Image sizes (px).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed calls per convolution (after one warm-up call).", lower_bound=1)
_SPLIT = flags.DEFINE_bool("split", False, "Also time the forward, the input gradient and the kernel gradient "
                           "each alone (three more programs per convolution).")
_IMPL = flags.DEFINE_enum("impl", "xla", ["xla", "im2col"], "xla: lax.conv_general_dilated; im2col: the "
                          "patches @ kernel product of fgpair_jax/models/conv.py (config.model.conv_impl).")
_OUT = flags.DEFINE_string("out", None, "JSON result file.")
BATCH = 64


def resnet18_convs(image_size: int):
    """(name, input spatial size, in channels, out channels, kernel, stride) of each distinct convolution
    of torchvision's ResNet-18 (stem 7x7/2 then a 3x3/2 max pool; stages 2-4 open with a 3x3/2 and a
    1x1/2 shortcut), with padding k // 2 as in `models/resnet.py`."""
    def down(size, stride, kernel):
        return (size + 2 * (kernel // 2) - kernel) // stride + 1

    convs = [("stem_7x7_s2", image_size, 3, 64, 7, 2)]
    size = down(down(image_size, 2, 7), 2, 3)  # after the stem and the max pool
    convs.append(("layer1_3x3", size, 64, 64, 3, 1))
    width = 64
    for stage in (2, 3, 4):
        out = width * 2
        convs += [(f"layer{stage}_3x3_s2", size, width, out, 3, 2), (f"layer{stage}_1x1_s2", size, width, out, 1, 2)]
        size = down(size, 2, 3)
        convs.append((f"layer{stage}_3x3", size, out, out, 3, 1))
        width = out
    return convs


def time_conv(size, cin, cout, kernel, stride) -> dict:
    x = jax.random.normal(jax.random.key(0), (BATCH, size, size, cin))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, cin, cout)) * 0.05
    pad = kernel // 2

    def conv(x, w):
        if _IMPL.value == "im2col":
            from fgpair_jax.models.conv import conv_im2col
            return conv_im2col(x, w, (stride, stride), ((pad, pad), (pad, pad)))
        return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def fwd_bwd(x, w):
        y, pullback = jax.vjp(conv, x, w)
        return pullback(jnp.ones_like(y))

    def milliseconds(fn):
        """(compile seconds, ms per call) of jax.jit(fn)(x, w)."""
        jitted = jax.jit(fn)
        start = time.perf_counter()
        jax.block_until_ready(jitted(x, w))
        compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(_STEPS.value):
            out = jitted(x, w)
        jax.block_until_ready(out)
        return compile_seconds, 1000 * (time.perf_counter() - start) / _STEPS.value

    compile_seconds, ms = milliseconds(fwd_bwd)
    parts = {}
    if _SPLIT.value:
        cotangent = jnp.ones(jax.eval_shape(conv, x, w).shape)
        parts = {"forward_ms": milliseconds(conv)[1],
                 "input_gradient_ms": milliseconds(lambda x, w: jax.vjp(lambda x: conv(x, w), x)[1](cotangent))[1],
                 "kernel_gradient_ms": milliseconds(lambda x, w: jax.vjp(lambda w: conv(x, w), w)[1](cotangent))[1]}
    out_size = (size + 2 * pad - kernel) // stride + 1
    gflop = 3 * 2 * BATCH * out_size * out_size * cout * cin * kernel * kernel / 1e9  # fwd + 2 backward convs
    return {"input_size": size, "output_size": out_size, "in_channels": cin, "out_channels": cout,
            "kernel": kernel, "stride": stride, "ms_per_call": ms, "gflop_per_call": gflop,
            "gflop_per_second": gflop / (ms / 1000), "compile_seconds": compile_seconds, **parts}


def main(argv):
    del argv
    results = {}
    for image_size in (int(s) for s in _SIZES.value):
        rows = {name: time_conv(*shape) for name, *shape in resnet18_convs(image_size)}
        total = sum(row["ms_per_call"] for row in rows.values())
        for row in rows.values():
            row["share_of_sum"] = row["ms_per_call"] / total
        results[str(image_size)] = {"sum_ms": total, "convolutions": rows}
        print(image_size, f"{total:.0f} ms", {n: round(r["ms_per_call"]) for n, r in rows.items()}, flush=True)
    report = {"benchmark": "conv_sweep", "impl": _IMPL.value, "batch": BATCH, "steps": _STEPS.value, "jax_version": jax.__version__,
              "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
              "host": {"cpu_count": os.cpu_count(), "machine": platform.machine()},
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_average_at_end": os.getloadavg()[0],
              "command": " ".join(sys.argv), "sizes": results}
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    app.run(main)
