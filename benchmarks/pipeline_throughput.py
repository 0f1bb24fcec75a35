"""Host input-pipeline cost: images/s per core of two-view training batches read from the CUB TFDS build.

Why: the host decodes JPEGs and makes two geometric views per image; if that is slower than the
accelerator's step, training is input bound. The host cores a GPU needs are (the step's img/s) / (one
core's img/s), so this measures one core's rate, per option of the pipeline (issue 27):

  before             TFDS decodes with PIL, views resampled by PIL: the pipeline as it was (and as it is
                     where OpenCV is not installed)
  tfds_opencv        TFDS decodes with OpenCV (the same pixels, installed with the package now)
  view_resize        + data.view_resize=opencv: views resampled by OpenCV
  reduced_decode     + data.reduced_decode: JPEGs decoded at 1/2, 1/4, 1/8 size when both crops allow
  stored_short_side  + data.stored_short_side = 8/7 x the image size (256 for 224): a build of smaller copies
  cache              + data.cache_gib: the train split decoded once into shared memory
  cache_pil          the cache alone, views resampled by PIL
  all                view_resize + stored_short_side + cache

Each (option, image size) is measured by ONE fresh process pinned to one core (os.sched_setaffinity), with
no grain worker process and one read thread, so everything it does runs on that core: `images_per_cpu_s`
(images / the process's CPU seconds) is one core's rate, the least load-sensitive number; `images_per_s`
(wall clock) is lower when other processes share the core (the load average is recorded). Start-up
(imports, opening the build, filling the cache) is excluded and reported.

    PYTHONPATH=. python benchmarks/pipeline_throughput.py --data_dir=/tmp/tfds  # ~5 min on 2 loaded cores
    python benchmarks/pipeline_throughput.py --options=before,all --image_sizes=224 --core=3

`--sweep` instead measures wall-clock img/s over grain worker and read-thread counts (all cores, one
process), the old mode: `--worker_counts 0,1,2 --read_threads 1,2`.

The builds go into --data_dir (default: a temporary directory, so the first run includes the builds,
~20 s each, reported separately and not counted).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

OPTIONS = {  # name -> (TFDS decoder, view_resize, reduced_decode, stored short side / image size, cache)
    "before": ("pil", "pil", False, 0, False),
    "tfds_opencv": ("opencv", "pil", False, 0, False),
    "view_resize": ("opencv", "opencv", False, 0, False),
    "reduced_decode": ("opencv", "opencv", True, 0, False),
    "stored_short_side": ("opencv", "opencv", False, 8 / 7, False),
    "cache": ("opencv", "opencv", False, 0, True),
    "cache_pil": ("opencv", "pil", False, 0, True),
    "all": ("opencv", "opencv", False, 8 / 7, True),
}
CACHE_GIB = 8.0  # the cache's budget in the benchmark: the CUB subset takes 0.46 GiB decoded


def _list(text, kind=str):
    return [kind(v) for v in text.split(",")]


def stored_short_side(option: str, image_size: int) -> int:
    fraction = OPTIONS[option][3]
    return int(round(image_size * fraction)) if fraction else 0


def measure_one_core(args, option: str, image_size: int) -> dict:
    """One core's rate of `option` at `image_size` (runs in the pinned child process)."""
    os.sched_setaffinity(0, {args.core})
    decoder, view_resize, reduced_decode, _, cache = OPTIONS[option]
    from tensorflow_datasets.core.features import image_feature  # pylint: disable=import-outside-toplevel

    from fgpair_jax.data import builder, cub, decoded_cache, pipeline  # pylint: disable=import-outside-toplevel

    if decoder == "pil":
        image_feature.cv2 = None  # TFDS falls back to PIL, as where OpenCV is not installed
    start = time.perf_counter()
    sources, _ = builder.load_sources(cub.DATA_SET, args.manual_dir, args.data_dir,
                                      stored_short_side=stored_short_side(option, image_size),
                                      encoded_images=reduced_decode)
    train = sources["train"]
    if cache:
        train = decoded_cache.decoded_cache(train, CACHE_GIB)
    start_up_seconds = time.perf_counter() - start
    iterator = iter(pipeline.train_dataset(train, global_batch_size=args.batch_size, image_size=image_size, seed=0,
                                           worker_count=0, read_threads=1, resize_with=view_resize))
    for _ in range(args.warmup):
        next(iterator)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        batch = next(iterator)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    assert batch["view1"].shape == (args.batch_size, image_size, image_size, 3)
    images = args.steps * args.batch_size
    return {"option": option, "image_size": image_size, "tfds_decoder": decoder, "view_resize": view_resize,
            "reduced_decode": reduced_decode, "stored_short_side": stored_short_side(option, image_size),
            "cache": cache, "images": images, "images_per_cpu_s": images / cpu_seconds,
            "cpu_ms_per_image": 1000 * cpu_seconds / images, "images_per_s": images / seconds,
            "start_up_seconds": start_up_seconds, "core": args.core,
            "load_average_1min_at_end": os.getloadavg()[0]}


def per_core_table(args) -> list:
    """Every (image size, option) in its own pinned process; the builds are made first, unpinned."""
    from fgpair_jax.data import builder, cub  # pylint: disable=import-outside-toplevel

    build_seconds = {}
    for short_side in sorted({stored_short_side(o, s) for o in args.options for s in args.image_sizes}):
        start = time.perf_counter()
        builder.load_sources(cub.DATA_SET, args.manual_dir, args.data_dir, stored_short_side=short_side)
        build_seconds[str(short_side)] = time.perf_counter() - start
    print(json.dumps({"build_or_load_seconds_by_stored_short_side": build_seconds}), flush=True)
    rows = []
    for image_size in args.image_sizes:
        for option in args.options:
            command = [sys.executable, os.path.abspath(__file__), f"--_child={option}:{image_size}",
                       f"--manual_dir={args.manual_dir}", f"--data_dir={args.data_dir}", f"--core={args.core}",
                       f"--batch_size={args.batch_size}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    before = {row["image_size"]: row["images_per_cpu_s"] for row in rows if row["option"] == "before"}
    for row in rows:
        if row["image_size"] in before:
            row["cpu_per_image_vs_before"] = before[row["image_size"]] / row["images_per_cpu_s"]
    return rows


def sweep(args, data_dir) -> list:
    """Wall-clock img/s per grain worker and read-thread count, in this process, on every core."""
    from fgpair_jax.data import builder, cub, pipeline  # pylint: disable=import-outside-toplevel

    sources, _ = builder.load_sources(cub.DATA_SET, args.manual_dir, data_dir)
    rows = []
    for image_size in args.image_sizes:
        for worker_count in args.worker_counts:
            for read_threads in args.read_threads:
                iterator = iter(pipeline.train_dataset(sources["train"], global_batch_size=args.batch_size,
                                                       image_size=image_size, seed=0, worker_count=worker_count,
                                                       read_threads=read_threads))
                for _ in range(args.warmup):
                    next(iterator)
                start = time.perf_counter()
                for _ in range(args.steps):
                    next(iterator)
                seconds = time.perf_counter() - start
                if hasattr(iterator, "close"):
                    iterator.close()
                row = {"image_size": image_size, "worker_count": worker_count, "read_threads": read_threads,
                       "images_per_s": args.steps * args.batch_size / seconds}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manual_dir", default="/work/shared/data/CUB_200_2011_subset100")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir; default: a temporary directory")
    parser.add_argument("--image_sizes", type=lambda t: _list(t, int), default=[224, 112])
    parser.add_argument("--options", type=_list, default=list(OPTIONS))
    parser.add_argument("--core", type=int, default=0, help="the core each measuring process is pinned to")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="the worker/thread wall-clock sweep instead")
    parser.add_argument("--worker_counts", type=lambda t: _list(t, int), default=[0])
    parser.add_argument("--read_threads", type=lambda t: _list(t, int), default=[2])
    parser.add_argument("--out", default="results/bench/pipeline_throughput.json")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        option, image_size = args._child.split(":")
        print(json.dumps(measure_one_core(args, option, int(image_size))), flush=True)
        return
    unknown = sorted(set(args.options) - set(OPTIONS))
    if unknown:
        parser.error(f"--options: unknown {unknown}; choose from {sorted(OPTIONS)}")

    with tempfile.TemporaryDirectory() as scratch:
        args.data_dir = args.data_dir or scratch
        report = {
            "benchmark": ("host pipeline: decode + 2 random-resized-crop/flip uint8 views per image, "
                          + ("wall-clock img/s by grain workers and read threads" if args.sweep else
                             "img/s of one core per option (one pinned process each)")),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "manual_dir": args.manual_dir,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "host_cpu_count": os.cpu_count(),
            "load_average_1_5_15min_at_start": os.getloadavg(),  # other processes sharing the CPUs skew img/s
            "platform": platform.platform(),
        }
        report["results"] = sweep(args, args.data_dir) if args.sweep else per_core_table(args)
        report["load_average_1_5_15min_at_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
