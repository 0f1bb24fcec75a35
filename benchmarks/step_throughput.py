"""Train-step throughput per SSL method on one config: images/s of the jitted step, and each method's
step time relative to `moco` (the fgpair target is <= 1.7x).

Synthetic uint8 batches are fed (the step is measured, not the input pipeline: see
pipeline_throughput.py for that). Compile time is reported separately.

    python benchmarks/step_throughput.py --config=configs/cub.py:quick --methods=moco \
        --out=results/bench/step_quick.json [--config.key=value ...]
"""
import json
import os
import platform
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from fgpair_jax import optim, parallel, state as state_lib, step as step_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cub.py:quick", "Config to time.")
_METHODS = flags.DEFINE_list("methods", ["moco"], "Methods to time (config.method is overridden).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per method (after 2 warm-up steps).")
_OUT = flags.DEFINE_string("out", "results/bench/step_throughput.json", "JSON result file.")


def synthetic_batch(config, seed):
    rng = np.random.default_rng(seed)
    shape = (config.global_batch_size, config.data.image_size, config.data.image_size, 3)
    return {"view1": rng.integers(0, 256, shape, dtype=np.uint8), "view2": rng.integers(0, 256, shape, dtype=np.uint8)}


def time_method(config, steps: int) -> dict:
    """Compile time and steady-state seconds per step of `config.method`'s jitted step."""
    mesh = parallel.make_mesh()
    steps_per_epoch = 1000
    tx = optim.make_optimizer(config, steps_per_epoch)
    queue_size = config.moco.queue_size or 16 * config.global_batch_size
    with config.unlocked():
        config.moco.queue_size = queue_size
    state = jax.device_put(state_lib.create_train_state(config, jax.random.key(0), tx,
                                                        state_lib.method_sizes(config, None)),
                           parallel.replicated(mesh))
    train_step = step_lib.make_train_step(config, tx, mesh, steps_per_epoch)
    batches = [parallel.global_batch(synthetic_batch(config, i), mesh) for i in range(2)]
    start = time.perf_counter()
    state, metrics = train_step(state, batches[0])
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    state, metrics = train_step(state, batches[1])
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(steps):
        state, metrics = train_step(state, batches[i % 2])
    jax.block_until_ready(metrics)
    seconds_per_step = (time.perf_counter() - start) / steps
    return {
        "compile_seconds": compile_seconds,
        "seconds_per_step": seconds_per_step,
        "images_per_second": config.global_batch_size / seconds_per_step,
    }


def main(argv):
    del argv
    base = _CONFIG.value
    results = {}
    for method in _METHODS.value:
        config = base.copy_and_resolve_references()
        with config.unlocked():
            config.method = method
            config.fgpair.warmup_epochs = 0.0  # time the full step (L_Cp on), not the decoder warm-up
            config.fgpair.ramp_epochs = 0.0
        results[method] = time_method(config, _STEPS.value)
        print(method, json.dumps(results[method]), flush=True)
    if "moco" in results:
        for method, result in results.items():
            result["step_time_vs_moco"] = result["seconds_per_step"] / results["moco"]["seconds_per_step"]
    report = {
        "benchmark": "train_step_throughput",
        "model": base.model.name,
        "image_size": base.data.image_size,
        "global_batch_size": base.global_batch_size,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "host": {"cpu_count": os.cpu_count(), "machine": platform.machine()},
        "jax_version": jax.__version__,
        "load_average_at_end": os.getloadavg()[0],
        "methods": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
