"""Compile seconds with JAX's persistent compilation cache cold against warm, each in a fresh process:
what a resume, a re-evaluation or the comparison table's next seed saves (`fgpair_jax/compilation_cache.py`).

Each trial starts a process on an empty cache folder (`cold`: it compiles and writes), then another on the
same folder (`warm`: it loads); `--modes=none,cold,warm` adds a process with the cache off (`none`: what a
run compiled before the cache was on by default). Each process times, from its own start (imports
included), the first train step of `--config` (state built as a run builds it, a synthetic batch fed) and
then the first evaluation feature pass on one `eval_batch_size` batch, and counts JAX's compile requests,
their seconds and the cache's hits.

    python benchmarks/compile_cache.py --config=configs/cub.py:quick --out=results/bench/compile_cache.json
"""
import time

STARTED = time.perf_counter()  # before the heavy imports: a run's start-up is part of what it waits for

import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cub.py:quick", "Config whose programs are compiled.")
_MODES = flags.DEFINE_list("modes", ["cold", "warm"], "Processes per trial, in order: none | cold | warm.")
_TRIALS = flags.DEFINE_integer("trials", 1, "Trials, each on a new empty cache folder.")
_OUT = flags.DEFINE_string("out", "results/bench/compile_cache.json", "JSON result file.")
_MIN_COMPILE = flags.DEFINE_float("min_compile_time_secs", None, "Programs compiling faster are not cached; "
                                  "default: the project's (compilation_cache.MIN_COMPILE_TIME_SECS).")
_CHILD = flags.DEFINE_string("child", "", "Internal: run one measuring process with this cache setting.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 1000  # as step_throughput.py: the schedule's length does not change the program's cost


def measure(config, cache_setting: str) -> dict:
    """The seconds from process start to the first finished train step and to the first feature pass,
    with JAX's compile requests (count, seconds) and the persistent cache's hits and misses."""
    import jax
    import numpy as np
    from jax._src import dispatch

    from fgpair_jax import compilation_cache, features, optim, parallel, state as state_lib, step as step_lib

    events = {"compile_requests": 0, "compile_seconds": 0.0, "cache_hits": 0, "cache_requests": 0}

    def on_duration(event, duration, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            events["compile_requests"] += 1
            events["compile_seconds"] += duration

    def on_event(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            events["cache_hits"] += 1
        elif event == "/jax/compilation_cache/compile_requests_use_cache":
            events["cache_requests"] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    compilation_cache.enable(cache_setting)
    if _MIN_COMPILE.value is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE.value)
    with config.unlocked():
        config.moco.queue_size = config.moco.queue_size or 16 * config.global_batch_size
    mesh = parallel.make_mesh()
    tx = optim.make_optimizer(config, STEPS_PER_EPOCH)
    state = jax.device_put(state_lib.create_train_state(config, jax.random.key(0), tx,
                                                        state_lib.method_sizes(config, None)),
                           parallel.replicated(mesh))
    train_step = step_lib.make_train_step(config, tx, mesh, STEPS_PER_EPOCH)
    rng = np.random.default_rng(0)
    size = config.data.image_size
    views = {name: rng.integers(0, 256, (config.global_batch_size, size, size, 3), dtype=np.uint8)
             for name in ("view1", "view2")}
    before_step = time.perf_counter()
    state, metrics = train_step(state, parallel.global_batch(views, mesh))
    jax.block_until_ready(metrics)
    first_step = time.perf_counter()
    step_events = dict(events)
    batch = features.eval_batch_size(config)
    images = {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8), "mask": np.ones(batch, bool)}
    placed = parallel.global_batch(images, mesh)
    jax.block_until_ready(features.make_feature_fn(config, mesh)(state.params, state.batch_stats, placed["image"],
                                                                  placed["mask"]))
    first_features = time.perf_counter()
    return {
        "seconds_to_first_step": first_step - STARTED,
        "first_step_call_seconds": first_step - before_step,
        "feature_pass_first_call_seconds": first_features - first_step,
        "seconds_to_first_feature_pass": first_features - STARTED,
        "until_first_step": step_events,
        "in_all": events,
        "cache_dir": compilation_cache.resolve_directory(cache_setting),
    }


def run_child(mode: str, folder: str) -> dict:
    """`measure` in a fresh process: `none` with the cache off, else on `folder`."""
    command = [sys.executable, os.path.abspath(__file__), f"--child={'none' if mode == 'none' else folder}",
               *[arg for arg in sys.argv[1:] if arg.startswith(("--config", "--min_compile_time_secs"))]]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{mode} process failed:\n{result.stderr[-3000:]}")
    line = [text for text in result.stdout.splitlines() if text.startswith("{")][-1]
    record = json.loads(line)
    record["process_wall_seconds"] = time.perf_counter() - started
    record["warnings"] = [text for text in result.stderr.splitlines() if "Warning" in text]
    return record


def main(argv):
    del argv
    if _CHILD.value:
        print(json.dumps(measure(_CONFIG.value, _CHILD.value)), flush=True)
        return
    load_at_start = os.getloadavg()
    trials = []
    for trial in range(_TRIALS.value):
        with tempfile.TemporaryDirectory(prefix="compile_cache_bench_") as folder:
            records = {}
            for mode in _MODES.value:
                records[mode] = run_child(mode, os.path.join(folder, "jax"))
                print(trial, mode, json.dumps({k: round(v, 1) for k, v in records[mode].items()
                                               if isinstance(v, float)}), flush=True)
            trials.append(records)
    import jax

    from fgpair_jax import compilation_cache

    config = _CONFIG.value
    report = {
        "benchmark": "compile_cache",
        "command": "python benchmarks/compile_cache.py " + " ".join(sys.argv[1:]),
        "method": config.method,
        "model": config.model.name,
        "image_size": config.data.image_size,
        "global_batch_size": config.global_batch_size,
        "eval_batch_size": config.eval.batch_size,
        "min_compile_time_secs": (compilation_cache.MIN_COMPILE_TIME_SECS if _MIN_COMPILE.value is None
                                  else _MIN_COMPILE.value),
        "host": {"cpu_count": os.cpu_count(), "machine": platform.machine()},
        "jax_version": jax.__version__,
        "load_average_1_5_15_at_start": list(load_at_start),
        "load_average_1_5_15_at_end": list(os.getloadavg()),
        "trials": trials,
    }
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
