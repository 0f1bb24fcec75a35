"""The one prepared command for a lent GPU: speed, memory and whether the method trains, in one JSON.

Why: this project has never run on an accelerator, and a lent GPU may be available for minutes only.
Those minutes go to this rehearsed script (CI runs `--smoke` on CPU, so it cannot rot), not to
exploration. Every number it writes is measured in the run that writes it.

Modes (one JSON each; `--out` says where):

    # The check (<= 8 min on one H100/H200 including compiles; launch/README.md):
    python benchmarks/gpu_check.py --out=results/bench/gpu_check.json
    # moco vs fgpair at the paper protocol on the CUB subset, one seed each, within M minutes of wall time:
    python benchmarks/gpu_check.py --paper_table --minutes=20 --out=results/bench/gpu_paper_table.json
    # FLOPs per image of every method's step from a CPU compile (no weights materialised):
    JAX_PLATFORMS=cpu python benchmarks/gpu_check.py --flops_only --out=results/bench/step_flops.json
    # Rehearsals on CPU at tiny sizes (what CI runs):
    python benchmarks/gpu_check.py --smoke --out=/tmp/gpu_check_smoke.json
    python benchmarks/gpu_check.py --smoke --paper_table --minutes=2 --out=/tmp/gpu_table_smoke.json

The check measures, for `moco` and `fgpair` at the paper config (`configs/cub.py`: ResNet-50, 224 px)
with `model.dtype=bfloat16`, at global batch 128 and 256 (`--batch_sizes`):
  - compile seconds of the jitted train step (`jax.jit(...).lower(abstract state, batch).compile()`;
    the state is a `jax.eval_shape` template, so nothing is materialised to compile);
  - step seconds and images/s over `--timed_steps` steps after `--warmup_steps`, fed fixed random uint8
    batches from a fresh random state, timed with `block_until_ready`;
  - FLOPs per step from the compiled step's `cost_analysis()['flops']` (per device: the partitioned
    module) and MFU = FLOPs per step / step seconds / the device's dense bf16 peak
    (`BF16_DENSE_PEAK_FLOPS`; null for a device kind not in the table);
  - memory: the compiled program's `memory_analysis()` (bytes) and the device's
    `memory_stats()['peak_bytes_in_use']` after the timed steps (a process-wide running maximum, so it
    grows monotonically through the list; null on CPU, which keeps no such statistic);
then the host input pipeline at 224 px on the CUB subset (`pipeline_section`: img/s with one grain worker
per host core, and one core's img/s of the default and of the fast pipeline, from which each step record's
`host_cores_needed`), and a short real training run of the paper config (`fgpair`, ResNet-50, bf16, `--train_epochs`
epochs; `fgpair_jax.train.train_and_evaluate`) whose `metrics.jsonl` says whether the contrastive loss
fell and whether any step was non-finite.

Weights: nothing can be downloaded on the lent machine, so torchvision's ImageNet ResNet-50 is absent.
The check's training run uses ResNet-50 with `model.init=none` (random start; its step program is the
batch-128 fgpair program already compiled, reused through JAX's persistent compilation cache), or the
checkpoint given by `--config.model.init=/path/to/resnet50.pth`. The paper table (`--table_encoder=auto`)
trains the packaged ImageNet EfficientNet-Lite0 at 224 px (`frozen_stages=0`), the one ImageNet encoder
available offline, unless `--config.model.init` names a checkpoint: then the config's model from it.
The JSON names the encoder and its start.

`--smoke` runs the same functions on CPU at tiny sizes (`SMOKE_OVERRIDES`: an 8-channel ResNet at
32 px, batch 8, float32 because a bfloat16 CPU compile takes minutes, 10 epochs of 12 steps) on a
synthetic CUB-layout folder (`write_smoke_cub`), always, even where the shared subset exists: the
subset's epoch at batch 8 is 375 steps and its evaluation decodes 5,900 JPEGs, more than CI's time
allows, and CI must not depend on data it may lack. The JSON says which data every number is from.
"""
import collections
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from fgpair_jax import compilation_cache, parallel, run, run_config, state as state_lib, step as step_lib, train
from fgpair_jax.evaluation import HEADLINE_METRICS
from fgpair_jax.metrics_writer import read_jsonl
from fgpair_jax.data import decoded_cache, pipeline, sources as data_sources, synthetic
from fgpair_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cub.py", "Base config (the paper protocol).",
                                          lock_config=False)
_OUT = flags.DEFINE_string("out", None, "JSON result file; default results/bench/gpu_check[_smoke].json, "
                           "gpu_paper_table[_smoke].json or step_flops.json by mode.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Same code paths on CPU at tiny sizes (SMOKE_OVERRIDES).")
_PAPER_TABLE = flags.DEFINE_bool("paper_table", False, "Train + evaluate moco and fgpair within --minutes.")
_FLOPS_ONLY = flags.DEFINE_bool("flops_only", False, "FLOPs per image of each method's step (CPU compile).")
_MINUTES = flags.DEFINE_float("minutes", 20.0, "--paper_table: wall-time budget of the whole mode.")
_METHODS = flags.DEFINE_list("methods", ["moco", "fgpair"], "Methods whose steps the check times.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", None, "Global batches the check times; default 128,256 "
                                 "(smoke: 8,16).")
_TIMED_STEPS = flags.DEFINE_integer("timed_steps", 10, "Timed steps per (method, batch) after warm-up.")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 2, "Untimed steps before timing (the first runs "
                                     "the program once more after compiling: allocation, autotuning).")
_TRAIN_EPOCHS = flags.DEFINE_integer("train_epochs", None, "Epochs of the check's training run; default 5 "
                                     "(smoke: the smoke config's num_epochs).")
_TABLE_ENCODER = flags.DEFINE_enum("table_encoder", "auto", ["auto", "config"],
                                   "--paper_table: auto = ImageNet EfficientNet-Lite0 unless --config.model.init "
                                   "is a checkpoint path; config = the config's model and init as given.")
_SAFETY = flags.DEFINE_float("safety", 0.85, "--paper_table: share of the remaining budget planned for "
                             "training steps (the rest absorbs checkpoints, logging, variance).")
_DEADLINE_MINUTES = flags.DEFINE_float("deadline_minutes", 7.5, "The check skips a step benchmark that "
                                       "would end past this (estimated from the method's previous one), "
                                       "and the training run when already past it.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Runs' workdirs and the TFDS build; default a temporary "
                               "directory, deleted at the end.")
_PAIR_STRIDES = flags.DEFINE_list("pair_strides", ["1", "2", "4", "8"], "--flops_only: fgpair.pair_stride values.")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 2999, "--flops_only: training-set size that sizes the MoCo "
                                  "queue (2,999: the CUB subset's train split); no data is read.")

# Dense (no sparsity) bf16 tensor peak per device, FLOP/s, from the vendors' spec sheets; first match of a
# case-insensitive substring of `device.device_kind` wins, so specific names come before general ones.
BF16_DENSE_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM (device_kind "NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),  # v5p
    ("TPU v6 lite", 918e12),  # v6e
)

# --smoke: the paper config shrunk to seconds on CPU (cf. configs/cub.py:tiny and tests/conftest.py).
# Large crops, softer colour jitter and a larger learning rate let an 8-channel net's contrastive loss
# fall on `write_smoke_cub`'s images: measured over 120 steps (10 epochs of 12) 2.74 -> 2.08, while over 60
# steps it fell 0.25, within the epoch-to-epoch noise, and with MoCo's 0.2-1 crops not at all. The
# check's training run lasts num_epochs, so it and the paper-table rehearsal run the very step programs
# that the step benchmark compiled (compilation-cache reads).
SMOKE_OVERRIDES = {
    "model.name": "resnet_tiny", "model.init": "none", "model.frozen_stages": 0, "model.bn_groups": 2,
    "model.dtype": "float32", "data.image_size": 32, "data.crop_scale_min": 0.9, "global_batch_size": 8,
    "num_epochs": 10, "fgpair.warmup_epochs": 1.0, "fgpair.ramp_epochs": 1.0,  # the paper's 10 + 10 of 100
    "moco.queue_size": 16, "moco.momentum": 0.9, "optim.learning_rate": 0.1,
    "augment.saturation": 0.0, "augment.hue": 0.0, "augment.grayscale_prob": 0.0,
    "augment.brightness": 0.2, "augment.contrast": 0.2,
    "fgpair.decoder_channels": (16, 8), "eval.batch_size": 16, "eval.knn_k": 3,
    "eval.figures": False,  # CPU seconds the rehearsal checks nothing of (tests/test_figures.py does)
    "model.conv_impl": "xla",  # the GPU's own path (`auto` takes im2col on CPU), and the faster compile
}
# --smoke and --flops_only on CPU: LLVM without optimisation compiles ~3x faster (measured on the tiny
# steps: fgpair 23 -> 8 s, its init 19 -> 4 s) and runs slower, which neither mode minds. XLA's cost
# analysis and buffer assignment work on the optimised HLO, before LLVM: the tiny steps' FLOPs and
# memory analysis came out identical with and without it. Set before the backend starts.
FAST_CPU_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0"
FAST_PIPELINE_CACHE_GIB = 16.0  # the fast pipeline's decoded-image budget (the CUB subset takes 0.46 GiB)
SMOKE_BATCH_SIZES = (8,)  # one size: each tiny step compile costs 15-35 s of CI's CPU
# On an accelerator: bfloat16 compute, as README.md and launch/README.md tell users to run.
ACCELERATOR_OVERRIDES = {"model.dtype": "bfloat16"}
# The packaged ImageNet encoder (the one available offline), at the paper's 224 px, nothing frozen.
LITE0_OVERRIDES = {"model.name": "efficientnet_lite0", "model.init": "imagenet", "model.frozen_stages": 0}
# Environment variables that change what the command does; recorded with it (XLA_FLAGS as set by main).
RECORDED_ENVIRONMENT = ("JAX_PLATFORMS", "XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR", "FGPAIR_CUB_DIR", "TFDS_DATA_DIR",
                        "CUDA_VISIBLE_DEVICES")


# ----------------------------------------------------------------------------- config and report helpers


def derive(config, **overrides):
    """A resolved copy of `config` with dotted overrides (keyword names use '__' for '.')."""
    return run_config.override(config, {k.replace("__", "."): v for k, v in overrides.items()})


def is_checkpoint_path(init: str) -> bool:
    return init not in ("none", "imagenet")


def bf16_peak_flops(device_kind: str):
    """Dense bf16 FLOP/s of one device of this kind, or None when the kind is not in the table."""
    for name, peak in BF16_DENSE_PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


def finite_or_none(value):
    """JSON has no NaN/Inf: a non-finite number is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def sanitize(tree):
    if isinstance(tree, dict):
        return {str(k): sanitize(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [sanitize(v) for v in tree]
    if isinstance(tree, (np.floating, np.integer, np.bool_)):
        tree = tree.item()
    return finite_or_none(tree)


def write_json(path: str, report: dict) -> None:
    """Written after every section (temporary file + rename): a run cut short keeps what it measured."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(sanitize(report), f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(temporary, path)


_STARTED = time.perf_counter()


def say(message: str) -> None:
    print(f"[gpu_check {time.perf_counter() - _STARTED:6.1f} s] {message}", flush=True)


def environment() -> dict:
    devices = jax.devices()
    kind = devices[0].device_kind
    return {
        "backend": jax.default_backend(),
        "device_kind": kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "bf16_dense_peak_flops_per_device": bf16_peak_flops(kind),
        "peak_source": "vendor spec sheet, dense bf16 tensor FLOP/s (BF16_DENSE_PEAK_FLOPS in this script)",
        "host": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }


def command_record(script_overrides: dict) -> dict:
    """The exact command (re-runnable) and every config override: the command line's and the script's."""
    return {
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "cwd": os.getcwd(),
        "environment_variables": {name: os.environ[name] for name in RECORDED_ENVIRONMENT if name in os.environ},
        "config_overrides": {
            "command_line": [a for a in sys.argv[1:] if a.startswith("--config.")],
            "script": {k: list(v) if isinstance(v, tuple) else v for k, v in script_overrides.items()},
        },
    }


_CACHE_EVENTS = collections.Counter()


def _count_cache_event(event: str, **unused) -> None:
    if event.startswith("/jax/compilation_cache/"):
        _CACHE_EVENTS[event.rsplit("/", 1)[1]] += 1


def cache_counts() -> dict:
    """Persistent-compilation-cache reads so far: hits (a program read back) and misses (compiled)."""
    return {"hits": _CACHE_EVENTS["cache_hits"], "misses": _CACHE_EVENTS["cache_misses"]}


def ensure_compilation_cache(workroot: str) -> str:
    """JAX's persistent compilation cache: the user's ($JAX_COMPILATION_CACHE_DIR) or one in `workroot`.

    Why: the check's training run compiles the same step program as the batch-128 fgpair benchmark, and
    the paper table's runs the same as its rate probes; with the cache the second compile is a read.
    """
    directory = compilation_cache.enable(jax.config.jax_compilation_cache_dir  # a run's limits: no undated entry
                                         or os.path.join(workroot, "jax_compilation_cache"))
    jax.monitoring.register_event_listener(_count_cache_event)
    return directory


# ----------------------------------------------------------------------------- data


def write_smoke_cub(folder: str, train_per_class: int = 32, test_per_class: int = 3, seed: int = 0) -> str:
    """`write_tiny_cub`'s layout (3 classes; 32 train + 3 test images each: 12 steps of 8 per epoch) with
    every image replaced by its own 4x4 random colour grid (48x48 px JPEG).

    Why: write_tiny_cub's images differ within a class only by pixel noise, which cropping and resizing
    erase, so instance discrimination (what the contrastive loss measures) has nothing to learn there.
    """
    synthetic.write_tiny_cub(folder, train_per_class=train_per_class, test_per_class=test_per_class, seed=seed)
    rng = np.random.default_rng(seed)
    with open(os.path.join(folder, "images.txt")) as f:
        names = [line.split()[1] for line in f if line.strip()]
    for name in names:
        grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(np.repeat(np.repeat(grid, 12, axis=0), 12, axis=1)).save(
            os.path.join(folder, "images", name), quality=95)
    return folder


def prepare_data(config, workroot: str, smoke: bool):
    """(config with data.manual_dir/data_dir set, sources, info, description); the TFDS build happens once."""
    if smoke:
        folder = write_smoke_cub(os.path.join(workroot, "smoke_cub", "CUB_200_2011"))
        config = derive(config, data__manual_dir=folder)
    config = derive(config, data__data_dir=config.data.data_dir or os.path.join(workroot, "tfds"))
    start = time.perf_counter()
    sources, info = data_sources.load_sources(config, workroot)
    described = {"manual_dir": config.data.manual_dir, "synthetic": smoke,
                 "split_sizes": dict(info.split_sizes), "build_or_load_seconds": time.perf_counter() - start}
    return config, sources, info, described


def measure_pipeline(source, *, batch_size: int, image_size: int, workers: int, steps: int,
                     resize_with: str = "pil") -> dict:
    """Images/s of the training pipeline (decode + two random-resized-crop/flip uint8 views per image) with
    `workers` grain worker processes, over `steps` batches after every worker delivered one (start-up
    excluded and reported)."""
    dataset = pipeline.train_dataset(source, global_batch_size=batch_size, image_size=image_size, seed=0,
                                     worker_count=workers, resize_with=resize_with)
    iterator = iter(dataset)
    start = time.perf_counter()
    for _ in range(max(2, workers + 1)):
        next(iterator)
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(iterator)
    seconds = time.perf_counter() - start
    assert batch["view1"].shape == (batch_size, image_size, image_size, 3), batch["view1"].shape
    if hasattr(iterator, "close"):
        iterator.close()
    return {"images_per_second": steps * batch_size / seconds, "image_size": image_size, "batch_size": batch_size,
            "worker_count": workers, "view_resize": resize_with, "timed_batches": steps, "seconds": seconds,
            "warmup_seconds": warmup_seconds, "load_average_at_end": os.getloadavg()[0]}


def measure_pipeline_per_core(source, *, batch_size: int, image_size: int, steps: int, resize_with: str) -> dict:
    """One core's images/s of the training pipeline: no worker process and one read thread, so this
    process's CPU seconds are the pipeline's (`images_per_cpu_second`; wall clock would count what other
    threads of the check do). The rate to divide a step's img/s by for the host cores it needs."""
    iterator = iter(pipeline.train_dataset(source, global_batch_size=batch_size, image_size=image_size, seed=0,
                                           worker_count=0, read_threads=1, resize_with=resize_with))
    next(iterator)
    cpu_start = time.process_time()
    for _ in range(steps):
        next(iterator)
    cpu_seconds = time.process_time() - cpu_start
    return {"images_per_cpu_second": steps * batch_size / cpu_seconds, "view_resize": resize_with,
            "timed_images": steps * batch_size}


def pipeline_section(config, sources, smoke: bool) -> dict:
    """The host input pipeline at 224 px on the check's data (issue 27).

    - top level: img/s with one grain worker per host core (the default on an accelerator: `data.worker_count
      = -1`) of the default pipeline (TFDS decode, PIL views);
    - `per_core`: one core's img/s of that pipeline (`default`) and of the fast one (`fast`: the train split
      decoded once into shared memory, `data.cache_gib`, and OpenCV views, `data.view_resize=opencv`);
    - `all_cores_fast`: the fast pipeline's img/s with one worker per core;
    `host_cores_needed` (each step record) divides the step's img/s by the per-core rates. On a lent 16-core
    GPU host: 16 workers for both all-core rates; this machine's per-core rates are in results/README.md
    (input pipeline).
    """
    workers = os.cpu_count()
    batch, steps = config.global_batch_size, max(8, 2 * workers)
    section = measure_pipeline(sources["train"], batch_size=batch, image_size=224, workers=workers, steps=steps)
    per_core_steps = 2 if smoke else 6
    section["per_core"] = {"default": measure_pipeline_per_core(sources["train"], batch_size=batch, image_size=224,
                                                                steps=per_core_steps, resize_with="pil")}
    start = time.perf_counter()
    try:  # a container's /dev/shm may be too small for the decoded split: recorded, not fatal
        cached = decoded_cache.decoded_cache(sources["train"], FAST_PIPELINE_CACHE_GIB)
    except ConfigError as error:
        section["fast_skipped"] = str(error)
        return section
    section["decoded_cache"] = {"gib": cached.nbytes / decoded_cache.GIB, "fill_seconds": time.perf_counter() - start}
    section["per_core"]["fast"] = measure_pipeline_per_core(cached, batch_size=batch, image_size=224,
                                                            steps=per_core_steps, resize_with="opencv")
    section["all_cores_fast"] = measure_pipeline(cached, batch_size=batch, image_size=224, workers=workers,
                                                 steps=steps, resize_with="opencv")
    return section


def host_cores_needed(images_per_second: float, section: dict) -> dict:
    """Host cores that feed `images_per_second` with each pipeline measured per core (`pipeline_section`)."""
    return {name: images_per_second / rate["images_per_cpu_second"]
            for name, rate in section.get("per_core", {}).items()}


# ----------------------------------------------------------------------------- the step




def abstract_batch(config, mesh) -> dict:
    """What the input pipeline yields, batch-sharded: {'view1','view2': uint8 [B, S, S, 3], 'label',
    'index': int32 [B]}, B the global batch, S the image size. The step reads only the views, but a run
    passes all four, and the program must be the run's (same inputs) for its compile to be shared."""
    size, batch, sharding = config.data.image_size, config.global_batch_size, parallel.batch_sharded(mesh)
    view = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8, sharding=sharding)
    vector = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)
    return {"view1": view, "view2": view, "label": vector, "index": vector}


def compile_step(config, num_train: int, mesh):
    """(tx, compiled step, record): AOT-lowers and compiles `make_train_step` of a run of `config` on
    `num_train` images against abstract arguments (`run.plan`'s restore template: no weights made).

    The record holds lower/compile seconds, XLA's FLOPs of one step (per device), the number of `while`
    loops in the program (cost analysis counts a loop body once, so 0 means nothing is undercounted) and
    the compiled program's memory analysis in bytes.
    """
    run_plan = run.plan(config, num_train, mesh)
    tx = run_plan.tx
    step_fn = step_lib.make_train_step(config, tx, mesh, run_plan.steps_per_epoch)
    start = time.perf_counter()
    lowered = step_fn.lower(run_plan.abstract_state, abstract_batch(config, mesh))
    lower_seconds = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per partition
        cost = cost[0]
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    record = {
        "method": config.method, "model": config.model.name, "dtype": config.model.dtype,
        "image_size": config.data.image_size, "global_batch_size": config.global_batch_size,
        **run_plan.method_sizes, "steps_per_epoch": run_plan.steps_per_epoch, "lower_seconds": lower_seconds, "compile_seconds": compile_seconds,
        "flops_per_step_per_device": flops,
        "flops_per_image": flops * jax.device_count() / config.global_batch_size if flops else None,
        "while_loops": while_loops(lowered.as_text(), compiled.as_text()),
        "compiled_memory_bytes": memory_analysis(compiled),
    }
    if config.method == "fgpair":
        record["pair_stride"] = config.fgpair.pair_stride
    return tx, compiled, record


def while_loops(lowered_text: str, compiled_text: str) -> dict:
    """Loops in the step and the largest array (elements) any of them carries.

    XLA's cost analysis counts a loop body once, however many times it runs, so FLOPs are undercounted
    by about (iterations - 1) x the body's work. In these steps the loops are JAX's threefry2x32 random
    bit generators (5 rounds of uint32 arithmetic on key-sized arrays), so the largest carry bounds
    what can be missed: a few element-wise ops per carried element, nothing like an encoder's convolutions.
    """
    def largest(lines, pattern, separator):
        sizes = [int(np.prod([int(d) for d in dims.split(separator) if d] or [1]))
                 for line in lines for dims in re.findall(pattern, line)]
        return max(sizes, default=0)

    lowered = [line for line in lowered_text.splitlines() if "stablehlo.while" in line]
    compiled = [line.split(" while(")[0] for line in compiled_text.splitlines() if " while(" in line]
    return {"lowered_count": len(lowered),
            # threefry2x32's loop carries 9 values (counter, rounds, 2 words, 3 key words, 2 rotations)
            "lowered_threefry_shaped_count": sum(line.count("%iterArg") == 9 for line in lowered),
            "lowered_largest_carry_elements": largest(lowered, r"tensor<((?:\d+x)*)[a-z]+\d*>", "x"),
            "compiled_count": len(compiled),
            "compiled_largest_carry_elements": largest(compiled, r"[a-z]+\d*\[([\d,]*)\]", ",")}


def memory_analysis(compiled) -> dict | None:
    """The compiled program's buffers in bytes; `total` = arguments + outputs - aliased + temporaries."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
             "generated_code_size_in_bytes")
    record = {name: int(getattr(stats, name)) for name in names if hasattr(stats, name)}
    if len(record) >= 4:
        record["total_bytes"] = (record["argument_size_in_bytes"] + record["output_size_in_bytes"]
                                 - record["alias_size_in_bytes"] + record["temp_size_in_bytes"])
    return record


def random_batch(config, seed: int) -> dict:
    """Random uint8 views (and placeholder label/index) shaped like `abstract_batch`."""
    rng = np.random.default_rng(seed)
    shape = (config.global_batch_size, config.data.image_size, config.data.image_size, 3)
    return {"view1": rng.integers(0, 256, shape, dtype=np.uint8), "view2": rng.integers(0, 256, shape, dtype=np.uint8),
            "label": np.zeros(shape[:1], np.int32), "index": np.arange(shape[0], dtype=np.int32)}


def device_memory() -> dict:
    """The first local device's allocator statistics in bytes (None where the backend keeps none: CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats:
        return {"peak_bytes_in_use": None, "bytes_in_use": None, "bytes_limit": None}
    return {name: stats.get(name) for name in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")}


def time_step(config, tx, compiled, sizes: dict, mesh, warmup: int, steps: int) -> dict:
    """Seconds per step of `compiled` from a fresh random state on two alternating random uint8 batches."""
    state = state_lib.create_train_state(config, jax.random.key(config.seed), tx, sizes)
    state = jax.device_put(state, parallel.replicated(mesh))
    batches = [parallel.global_batch(random_batch(config, seed), mesh) for seed in range(2)]
    for index in range(warmup):
        state, metrics = compiled(state, batches[index % 2])
    jax.block_until_ready((state, metrics))
    finite, losses = [], []
    start = time.perf_counter()
    for index in range(steps):
        state, metrics = compiled(state, batches[index % 2])
        finite.append(metrics["finite"])
        losses.append(metrics["loss"])
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / steps
    finite = [bool(f) for f in jax.device_get(finite)]
    record = {"warmup_steps": warmup, "timed_steps": steps, "seconds_per_step": seconds,
              "images_per_second": config.global_batch_size / seconds, "all_timed_steps_finite": all(finite),
              "last_loss": float(jax.device_get(losses[-1])), "device_memory_after": device_memory()}
    del state, batches
    return record


def mfu(flops_per_step_per_device, seconds_per_step, peak):
    if not flops_per_step_per_device or not peak:
        return None
    return flops_per_step_per_device / seconds_per_step / peak


def cpu_flops_per_image(method: str, pair_stride: int):
    """FLOPs per image of `method` from the committed CPU compile (`results/bench/step_flops.json`), as a
    cross-check of the accelerator's cost analysis (which may not count library calls the same way)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "bench",
                        "step_flops.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        flops = json.load(f)
    if method == "fgpair":
        return flops.get("fgpair_by_pair_stride", {}).get(str(pair_stride), {}).get("flops_per_image")
    return flops.get("methods", {}).get(method, {}).get("flops_per_image")


def benchmark_step(config, num_train: int, mesh, environment_record: dict) -> dict:
    """Compile + time one (method, batch) of `config`; the step program is the one a run of `config`
    on `num_train` images compiles (same schedule, queue and shapes)."""
    tx, compiled, record = compile_step(config, num_train, mesh)
    sizes = state_lib.method_sizes(config, num_train)
    record.update(time_step(config, tx, compiled, sizes, mesh, _WARMUP_STEPS.value, _TIMED_STEPS.value))
    peak = environment_record["bf16_dense_peak_flops_per_device"]
    record["mfu"] = mfu(record["flops_per_step_per_device"], record["seconds_per_step"], peak)
    cpu_flops = cpu_flops_per_image(config.method, config.fgpair.pair_stride)
    if cpu_flops:
        per_device = cpu_flops * config.global_batch_size / jax.device_count()
        record["mfu_from_cpu_step_flops"] = mfu(per_device, record["seconds_per_step"], peak)
    del compiled
    return record


# ----------------------------------------------------------------------------- a training run


def scale_pair_schedule(config, epochs: int):
    """`config` for `epochs` epochs, fgpair's decoder warm-up and L_Cp ramp keeping their share of the run
    (the paper config's 10 + 10 of 100 epochs become 0.5 + 0.5 of 5)."""
    share = epochs / config.num_epochs
    return derive(config, num_epochs=epochs, fgpair__warmup_epochs=config.fgpair.warmup_epochs * share,
                  fgpair__ramp_epochs=config.fgpair.ramp_epochs * share)




def loss_summary(workdir: str, steps_per_epoch: int, queue_fill_steps: int) -> dict:
    """What a run's `metrics.jsonl` says: per-epoch means of the loss terms, non-finite steps, and whether
    the contrastive loss L_C fell.

    L_C (`loss_contrastive`, every method's) is compared over two windows of up to one epoch: the first
    steps after the queue first holds only real keys (before that its random negatives are easy and the
    loss reads low) and the last steps. fgpair's total loss adds L_Cp as it ramps in, so it is not used.
    """
    entries = [e for e in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in e]
    nonfinite = [e["step"] for e in entries if e.get("finite", 1.0) < 0.5]
    names = sorted(k for k in entries[0] if k.startswith("loss")) if entries else []
    epochs = {}
    for entry in entries:
        epochs.setdefault((entry["step"] - 1) // steps_per_epoch + 1, []).append(entry)
    per_epoch = {str(epoch): {name: float(np.mean([e[name] for e in group])) for name in names}
                 for epoch, group in sorted(epochs.items())}
    after_fill = [e for e in entries if e["step"] > queue_fill_steps and e.get("finite", 1.0) >= 0.5]
    window = min(steps_per_epoch, len(after_fill) // 2)
    summary = {"logged_steps": len(entries), "nonfinite_steps": nonfinite, "per_epoch_means": per_epoch,
               "queue_fill_steps": queue_fill_steps, "window_steps": window,
               "images_per_second_logged": [e["images_per_second"] for e in entries if "images_per_second" in e][-5:]}
    if window:
        early = float(np.mean([e["loss_contrastive"] for e in after_fill[:window]]))
        late = float(np.mean([e["loss_contrastive"] for e in after_fill[-window:]]))
        summary.update(loss_contrastive_early=early, loss_contrastive_late=late, loss_fell=late < early)
    else:
        summary["loss_fell"] = None
    return summary


def training_run(config, workdir: str, num_train: int) -> dict:
    """train_and_evaluate(config, workdir) timed, with its evaluation metrics and loss summary."""
    start, cache_before = time.perf_counter(), cache_counts()
    error = None
    try:
        metrics = train.train_and_evaluate(config, workdir)
    except Exception as exception:  # recorded, not hidden: e.g. a non-finite step under on_nonfinite=stop
        metrics, error = {}, f"{type(exception).__name__}: {str(exception).splitlines()[0] if str(exception) else ''}"
    record = {"method": config.method, "model": config.model.name, "init": config.model.init,
              "dtype": config.model.dtype, "image_size": config.data.image_size, "epochs": config.num_epochs,
              "global_batch_size": config.global_batch_size, "seed": config.seed,
              "fgpair_warmup_epochs": config.fgpair.warmup_epochs, "fgpair_ramp_epochs": config.fgpair.ramp_epochs,
              "wall_seconds": time.perf_counter() - start, "error": error,
              "compilation_cache": {k: v - cache_before[k] for k, v in cache_counts().items()},
              "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and config.num_epochs:
        steps_per_epoch = pipeline.steps_per_epoch(num_train, config.global_batch_size)
        queue_fill = state_lib.method_sizes(config, num_train).get("queue_size", 0) // config.global_batch_size
        record["log"] = loss_summary(workdir, steps_per_epoch, queue_fill)
    return record


def training_workers(smoke: bool) -> int:
    """Grain workers of the training runs: every host core on an accelerator host (224 px decode is the
    bottleneck otherwise); none in the smoke run, where spawning workers per pass would cost more than
    the tiny folder's decoding."""
    return 0 if smoke else os.cpu_count()


# ----------------------------------------------------------------------------- modes


def run_check(base, workroot: str, out: str, smoke: bool, report: dict) -> dict:
    mesh = parallel.make_mesh()
    config, sources, info, report["data"] = prepare_data(base, workroot, smoke)
    num_train = info.split_sizes["train"]
    write_json(out, report)

    say("input pipeline ...")
    report["input_pipeline"] = pipeline_section(config, sources, smoke)
    per_core = {name: f"{rate['images_per_cpu_second']:.0f}" for name, rate in report["input_pipeline"]["per_core"].items()}
    say(f"input pipeline: {report['input_pipeline']['images_per_second']:.0f} img/s at 224 px on "
        f"{os.cpu_count()} workers; per core {per_core} img/s")
    write_json(out, report)

    # The training run's config; the benchmarked steps are this config per (method, batch), so the batch
    # size's fgpair program is the one the training run compiles (a cache read there).
    epochs = _TRAIN_EPOCHS.value or (config.num_epochs if smoke else 5)
    train_config = scale_pair_schedule(config, epochs)
    if not is_checkpoint_path(train_config.model.init):
        train_config = derive(train_config, model__init="none")
    train_config = derive(train_config, method="fgpair", log_every_steps=1, on_nonfinite="skip",
                        eval__knn_every_epochs=0, data__worker_count=training_workers(smoke))
    batch_sizes = [int(b) for b in _BATCH_SIZES.value] if _BATCH_SIZES.value else (
        list(SMOKE_BATCH_SIZES) if smoke else [128, 256])
    deadline = 60.0 * _DEADLINE_MINUTES.value
    report["deadline_seconds"] = deadline
    report["steps"], bench_wall = {}, {}

    def bench(batch):
        for method in _METHODS.value:
            elapsed, estimate = time.perf_counter() - _STARTED, bench_wall.get(method, 0.0)
            if elapsed + estimate > deadline:
                report["steps"].setdefault(method, {})[str(batch)] = {
                    "skipped": f"{elapsed:.0f} s elapsed + {estimate:.0f} s (this method's last benchmark) "
                               f"> --deadline_minutes"}
                say(f"step: {method} at global batch {batch}: skipped (deadline)")
                continue
            say(f"step: {method} at global batch {batch} ...")
            start = time.perf_counter()
            record = benchmark_step(derive(train_config, method=method, global_batch_size=batch), num_train, mesh, report)
            record["host_cores_needed"] = host_cores_needed(record["images_per_second"], report["input_pipeline"])
            bench_wall[method] = record["wall_seconds"] = time.perf_counter() - start
            report["steps"].setdefault(method, {})[str(batch)] = record
            moco = report["steps"].get("moco", {}).get(str(batch), {})
            if "seconds_per_step" in moco:
                record["step_time_vs_moco"] = record["seconds_per_step"] / moco["seconds_per_step"]
            say(f"step: {method} batch {batch}: compile {record['compile_seconds']:.1f} s, "
                f"{record['images_per_second']:.1f} img/s, MFU {record['mfu']}")
            write_json(out, report)

    # The first batch size's programs, then the training run (its step is the first batch's fgpair
    # program when that batch is the config's), then the other sizes: what matters most comes first if
    # the deadline cuts the list. Device peaks are a running maximum, so later ones are upper bounds.
    bench(batch_sizes[0])
    if time.perf_counter() - _STARTED > deadline:
        report["training_run"] = {"skipped": "past --deadline_minutes"}
    else:
        say(f"training run: fgpair, {train_config.model.name} (init {train_config.model.init}), "
            f"{train_config.num_epochs} epochs ...")
        record = training_run(train_config, os.path.join(workroot, "train_check_fgpair"), num_train)
        record["device_memory_after"] = device_memory()
        report["training_run"] = record
        log = record.get("log", {})
        say(f"training run: {record['wall_seconds']:.0f} s, loss fell {log.get('loss_fell')}, "
            f"non-finite steps {log.get('nonfinite_steps')}, error {record['error']}")
    write_json(out, report)
    for batch in batch_sizes[1:]:
        bench(batch)
    return report


def table_config(base):
    """The paper table's encoder (see `--table_encoder`), with what was chosen."""
    if _TABLE_ENCODER.value == "config" or _SMOKE.value or is_checkpoint_path(base.model.init):
        return base, {}
    return derive(base, **{k.replace(".", "__"): v for k, v in LITE0_OVERRIDES.items()}), dict(LITE0_OVERRIDES)


def run_paper_table(base, workroot: str, out: str, smoke: bool, report: dict, started: float) -> dict:
    """moco and fgpair (one seed) at the paper protocol within --minutes of wall time, epochs sized from
    the measured step rate: min(config.num_epochs, what the remaining budget affords).

    Order: data; the `init` reference row (the start encoder evaluated, no SSL step), whose wall time is
    the evaluation's cost; a rate probe per method (the compiled step fed by the real input pipeline, so
    min(device, host) rate); then the two runs. Budget left for training steps = safety x (budget -
    elapsed - per method: its probe's compile seconds + the init row's wall seconds).
    """
    mesh = parallel.make_mesh()
    budget_seconds = 60.0 * _MINUTES.value
    config, encoder_overrides = table_config(base)
    report["config_overrides"]["script"].update(encoder_overrides)
    config, sources, info, report["data"] = prepare_data(config, workroot, smoke)
    num_train = info.split_sizes["train"]
    config = derive(config, eval__knn_every_epochs=0, data__worker_count=training_workers(smoke))
    report["encoder"] = {"model": config.model.name, "init": config.model.init, "image_size": config.data.image_size,
                         "dtype": config.model.dtype}
    write_json(out, report)

    say("init row (the start encoder evaluated without training) ...")
    report["init"] = training_run(derive(config, method="moco", num_epochs=0), os.path.join(workroot, "init"),
                                  num_train)
    evaluation_seconds = report["init"]["wall_seconds"]
    write_json(out, report)

    steps_per_epoch = pipeline.steps_per_epoch(num_train, config.global_batch_size)
    probes = {}
    for method in ("moco", "fgpair"):
        say(f"rate probe: {method} ...")
        probes[method] = probe_rate(scale_pair_schedule(derive(config, method=method), config.num_epochs),
                                    sources["train"], num_train, mesh)
        say(f"rate probe: {method}: {probes[method]['seconds_per_step']:.3f} s/step")
    elapsed = time.perf_counter() - started
    fixed = sum(probe["compile_seconds"] + evaluation_seconds for probe in probes.values())
    seconds_per_epoch = sum(steps_per_epoch * probe["seconds_per_step"] for probe in probes.values())
    affordable = _SAFETY.value * (budget_seconds - elapsed - fixed) / seconds_per_epoch
    epochs = int(max(1, min(config.num_epochs, math.floor(affordable))))
    report["sizing"] = {
        "budget_seconds": budget_seconds, "elapsed_before_runs_seconds": elapsed,
        "evaluation_seconds_per_run (init row wall)": evaluation_seconds,
        "probes": probes, "steps_per_epoch": steps_per_epoch,
        "planned_seconds_per_epoch_both_methods": seconds_per_epoch, "safety": _SAFETY.value,
        "affordable_epochs": affordable, "config_epochs": config.num_epochs, "epochs": epochs,
        "rule": "epochs = max(1, min(config_epochs, floor(safety * (budget - elapsed - sum over methods of "
                "(probe compile + init-row wall)) / sum over methods of (steps_per_epoch * probe s/step))))",
    }
    write_json(out, report)

    report["methods"] = {}
    for method in ("moco", "fgpair"):
        train_config = scale_pair_schedule(derive(config, method=method), epochs)
        say(f"run: {method}, {epochs} epochs ...")
        report["methods"][method] = training_run(train_config, os.path.join(workroot, method), num_train)
        say(f"run: {method}: {report['methods'][method]['wall_seconds']:.0f} s, "
            f"{report['methods'][method]['metrics']}")
        write_json(out, report)
    moco, fgpair = (report["methods"][m]["metrics"] for m in ("moco", "fgpair"))
    report["fgpair_minus_moco"] = {k: fgpair[k] - moco[k] for k in HEADLINE_METRICS if k in moco and k in fgpair}
    report["within_budget"] = time.perf_counter() - started <= budget_seconds
    return report


def probe_rate(config, source, num_train: int, mesh) -> dict:
    """Compile seconds and seconds per step of `config`'s step fed by the real input pipeline (with
    `config.data.worker_count` workers), over up to one epoch after warm-up: the rate a run will see."""
    tx, compiled, record = compile_step(config, num_train, mesh)
    state = jax.device_put(state_lib.create_train_state(config, jax.random.key(config.seed), tx,
                                                        state_lib.method_sizes(config, num_train)),
                           parallel.replicated(mesh))
    dataset = pipeline.train_dataset(source, global_batch_size=config.global_batch_size,
                                     image_size=config.data.image_size, seed=config.seed,
                                     worker_count=config.data.worker_count,
                                     crop_scale=(config.data.crop_scale_min, 1.0))
    iterator = iter(dataset)
    warmup = max(_WARMUP_STEPS.value, config.data.worker_count + 1)
    steps = max(4, min(record["steps_per_epoch"], 3 * _TIMED_STEPS.value))
    for _ in range(warmup):
        state, metrics = compiled(state, parallel.global_batch(next(iterator), mesh))
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, parallel.global_batch(next(iterator), mesh))
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / steps
    if hasattr(iterator, "close"):
        iterator.close()
    return {"compile_seconds": record["compile_seconds"], "seconds_per_step": seconds,
            "images_per_second": config.global_batch_size / seconds, "timed_steps": steps, "warmup_steps": warmup,
            "worker_count": config.data.worker_count}


def run_flops(base, out: str, report: dict) -> dict:
    """FLOPs per image of each method's step at the paper config from XLA's cost analysis of CPU compiles
    against abstract arguments (no weights materialised).

    `methods`: moco, lcr, fgpair at global batch 8. `batch_128`: the same at the paper's batch 128, with
    fgpair at every `--pair_strides` value (the ratios to moco in `fgpair_over_moco_by_pair_stride` come
    from these: at batch 8, strides 4 and 8 leave 2 and 1 synthesized images, fewer than the 4 batch-norm
    groups need) and each program's memory analysis (a CPU compile's buffer assignment in bytes, not a
    GPU's peak: the check measures that).
    """
    mesh = parallel.make_mesh()
    num_train = _NUM_TRAIN.value

    def measure(config):
        _, compiled, record = compile_step(config, num_train, mesh)
        del compiled
        say(f"flops: {config.method} batch {config.global_batch_size}"
            f"{' pair_stride %d' % config.fgpair.pair_stride if config.method == 'fgpair' else ''}: "
            f"{record['flops_per_image'] / 1e9:.2f} GFLOP/image, compile {record['compile_seconds']:.0f} s")
        return record

    report.update(methods={}, batch_128={}, fgpair_by_pair_stride={})
    report["note"] = ("FLOPs from compiled.cost_analysis()['flops'] of XLA:CPU compiles, float32, per step "
                      "divided by the global batch. A while loop's body is counted once: while_loops gives "
                      "their count and largest carried array (JAX's threefry RNG loops here). "
                      "compiled_memory_bytes is a CPU compile's buffer assignment, not GPU memory.")
    for method in ("moco", "lcr", "fgpair"):
        report["methods"][method] = measure(derive(base, method=method, global_batch_size=8))
        write_json(out, report)
    moco = report["methods"]["moco"]["flops_per_image"]
    for record in report["methods"].values():
        record["ratio_to_moco"] = record["flops_per_image"] / moco
    report["gflops_per_image"] = {m: r["flops_per_image"] / 1e9 for m, r in report["methods"].items()}
    write_json(out, report)

    programs = [("moco", "moco", 1), ("lcr", "lcr", 1)]
    programs += [(f"fgpair_pair_stride_{int(k)}", "fgpair", int(k)) for k in _PAIR_STRIDES.value]
    for name, method, stride in programs:
        report["batch_128"][name] = measure(derive(base, method=method, global_batch_size=128,
                                                   fgpair__pair_stride=stride))
        write_json(out, report)
    moco_128 = report["batch_128"]["moco"]["flops_per_image"]
    for name, record in report["batch_128"].items():
        record["ratio_to_moco"] = record["flops_per_image"] / moco_128
        if name.startswith("fgpair"):
            report["fgpair_by_pair_stride"][str(record["pair_stride"])] = record
    report["fgpair_over_moco_by_pair_stride"] = {k: r["ratio_to_moco"] for k, r in report["fgpair_by_pair_stride"].items()}
    report["compiled_memory_total_bytes_batch_128"] = {
        name: r["compiled_memory_bytes"]["total_bytes"] for name, r in report["batch_128"].items()}
    return report


def default_out() -> str:
    suffix = "_smoke" if _SMOKE.value else ""
    if _FLOPS_ONLY.value:
        return "results/bench/step_flops.json" if not _SMOKE.value else "results/bench/step_flops_smoke.json"
    return f"results/bench/{'gpu_paper_table' if _PAPER_TABLE.value else 'gpu_check'}{suffix}.json"


def main(argv):
    del argv
    started = time.perf_counter()
    out = _OUT.value or default_out()
    smoke = _SMOKE.value
    if smoke or _FLOPS_ONLY.value:  # FLOPs and buffer sizes are HLO-level: LLVM's level changes neither
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_CPU_COMPILE_XLA_FLAGS}".strip()
    script_overrides = dict(SMOKE_OVERRIDES) if smoke else (
        {} if _FLOPS_ONLY.value or jax.default_backend() == "cpu" else dict(ACCELERATOR_OVERRIDES))
    if _FLOPS_ONLY.value:  # the GPU's program (XLA's convolutions), not the CPU's im2col one
        script_overrides["model.conv_impl"] = "xla"
    base = run_config.override(_CONFIG.value, script_overrides)
    mode = "flops_only" if _FLOPS_ONLY.value else "paper_table" if _PAPER_TABLE.value else "check"
    report = {"benchmark": "gpu_check", "mode": mode, "smoke": smoke, "complete": False,
              **command_record(script_overrides), **environment(),
              "config": json.loads(base.to_json_best_effort())}
    if mode == "paper_table":
        report["minutes"] = _MINUTES.value
    say(f"{mode}{' (smoke)' if smoke else ''} on {report['device_count']} x {report['device_kind']} -> {out}")
    own_workroot = _WORKDIR.value is None
    workroot = tempfile.mkdtemp(prefix="gpu_check_") if own_workroot else _WORKDIR.value
    try:
        if mode != "flops_only":
            report["compilation_cache_dir"] = ensure_compilation_cache(workroot)
        write_json(out, report)
        if mode == "flops_only":
            run_flops(base, out, report)
        elif mode == "paper_table":
            run_paper_table(base, workroot, out, smoke, report, started)
        else:
            run_check(base, workroot, out, smoke, report)
        report["complete"] = True
    finally:
        report["wall_seconds"] = time.perf_counter() - started
        write_json(out, report)
        if own_workroot:
            shutil.rmtree(workroot, ignore_errors=True)
    say(f"done in {report['wall_seconds']:.0f} s: {out}")


if __name__ == "__main__":
    app.run(main)
