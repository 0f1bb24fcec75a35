"""Train-step throughput of EfficientNet-Lite0 with the two depthwise-conv implementations.

Why: on XLA:CPU the grouped convolution behind `nn.Conv(feature_group_count=C)` (and even more its weight
gradient) dominates an EfficientNet train step; `depthwise_impl="shifted"` writes it as a sum of shifted
multiplies. This measures both (and optionally `frozen_stages`) so `auto` can be justified per backend.

A "train step" is what SSL training does to the encoder: forward in train mode (batch statistics,
running averages updated), gradient of a loss on the pooled features w.r.t. all params, SGD update.

    python benchmarks/depthwise_conv.py --out /tmp/depthwise_conv.json          # ~5 min on 2 idle cores
    python benchmarks/depthwise_conv.py --sizes 112 --impls shifted --frozen_stages 0,2,3
"""
import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fgpair_jax.models.efficientnet_lite import EfficientNetLite0


def make_train_step(model, optimizer):
    """A jitted (params, batch_stats, opt_state, images) -> (params, batch_stats, opt_state, loss)."""

    def loss_fn(params, batch_stats, images):
        (_, pooled), updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                           train=True, mutable=["batch_stats"])
        return jnp.mean(jnp.square(pooled)), updates["batch_stats"]

    @jax.jit
    def step(params, batch_stats, opt_state, images):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, images)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return step


def measure(size: int, impl: str, frozen_stages: int, batch: int, repeats: int) -> dict:
    """Compile time, then img/s (median) over `repeats` steps after one warm-up step."""
    model = EfficientNetLite0(depthwise_impl=impl, frozen_stages=frozen_stages)
    images = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3), jnp.float32)
    variables = model.init(jax.random.PRNGKey(1), images[:1], train=False)
    optimizer = optax.sgd(0.01, momentum=0.9)
    state = (variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))
    step = make_train_step(model, optimizer)
    start = time.perf_counter()
    compiled = step.lower(*state, images).compile()
    compile_s = time.perf_counter() - start
    state = compiled(*state, images)[:3]  # warm-up: the first run of an executable is ~1.5x slower
    jax.block_until_ready(state)
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        *state, loss = compiled(*state, images)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    step_s = float(np.median(times))
    # CPU seconds (all threads) per step: less sensitive than wall time to other load on a shared box.
    cpu_s = float(np.median(cpu_times))
    return {"size": size, "impl": impl, "frozen_stages": frozen_stages, "batch": batch,
            "compile_s": round(compile_s, 2), "step_s_median": round(step_s, 3),
            "step_s_all": [round(t, 3) for t in times], "img_per_s": round(batch / step_s, 2),
            "cpu_s_per_step": round(cpu_s, 3), "img_per_cpu_s": round(batch / cpu_s, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="112,160,224", help="comma-separated image sizes")
    parser.add_argument("--impls", default="shifted,conv", help="depthwise implementations to compare")
    parser.add_argument("--frozen_stages", default="0", help="comma-separated frozen_stages values")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per setting (median reported)")
    parser.add_argument("--out", default=None, help="JSON file to write (also printed)")
    args = parser.parse_args()
    results = []
    for frozen in (int(f) for f in args.frozen_stages.split(",")):
        for size in (int(s) for s in args.sizes.split(",")):
            for impl in args.impls.split(","):
                results.append(measure(size, impl, frozen, args.batch, args.repeats))
                print(json.dumps(results[-1]), flush=True)
    report = {"benchmark": "efficientnet_lite0 train step", "backend": jax.default_backend(),
              "load_average_after": os.getloadavg(),
              "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
              "machine": platform.machine(), "jax": jax.__version__, "results": results}
    if args.out:
        with open(args.out, "w") as stream:
            json.dump(report, stream, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
