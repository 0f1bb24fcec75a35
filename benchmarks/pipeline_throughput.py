"""Host input-pipeline throughput: images/s of two-view training batches read from the CUB TFDS build.

Why: the host decodes JPEGs and makes two geometric views per image; if that is slower than the
accelerator's step, training is input bound. This measures the pipeline alone (no model), per image size,
grain worker count and read-thread count, and also the bare source read (JPEG decode only) as a ceiling.
On a shared machine wall-clock img/s understates the pipeline; `cpu_ms_per_image` (worker_count=0 rows)
is the less load-sensitive cost, and host_cpu_count * 1000 / cpu_ms_per_image bounds what all cores give.

    PYTHONPATH=. python benchmarks/pipeline_throughput.py --out results/bench/pipeline.json  # ~1-2 min
    python benchmarks/pipeline_throughput.py --image_sizes 224 --worker_counts 0,1,2 --read_threads 1,2,4

The build goes into --data_dir (default: a temporary directory, so the first run includes a ~20 s build,
which is reported separately and not counted in the throughput).
"""
import argparse
import json
import os
import platform
import tempfile
import time

from fgpair_jax.data import builder, cub, pipeline


def _int_list(text):
    return [int(v) for v in text.split(",")]


def measure_source_decode(source, count):
    """Images/s of reading + decoding records in order (one thread): the ceiling for the whole pipeline."""
    start = time.perf_counter()
    for index in range(count):
        source[index % len(source)]["image"]
    return count / (time.perf_counter() - start)


def measure_train_pipeline(source, *, image_size, worker_count, read_threads, batch_size, steps, warmup):
    """Images/s (each image yields two views) over `steps` batches after `warmup` batches."""
    dataset = pipeline.train_dataset(
        source, global_batch_size=batch_size, image_size=image_size, seed=0,
        worker_count=worker_count, read_threads=read_threads,
    )
    iterator = iter(dataset)
    start_up = time.perf_counter()
    for _ in range(warmup):
        next(iterator)
    warmup_seconds = time.perf_counter() - start_up
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        batch = next(iterator)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    assert batch["view1"].shape == (batch_size, image_size, image_size, 3)
    if hasattr(iterator, "close"):
        iterator.close()
    row = {"images_per_s": steps * batch_size / seconds, "seconds": seconds, "warmup_seconds": warmup_seconds}
    if worker_count == 0:  # All work is in this process, so its CPU time is the pipeline's cost per image.
        row["cpu_ms_per_image"] = 1000 * cpu_seconds / (steps * batch_size)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manual_dir", default="/work/shared/data/CUB_200_2011_subset100")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir; default: a temporary directory")
    parser.add_argument("--image_sizes", type=_int_list, default=[112, 224])
    parser.add_argument("--worker_counts", type=_int_list, default=[0])
    parser.add_argument("--read_threads", type=_int_list, default=[2])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="results/bench/pipeline.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data_dir or scratch
        start = time.perf_counter()
        sources, info = builder.load_sources(cub.DATA_SET, args.manual_dir, data_dir)
        load_seconds = time.perf_counter() - start
        train = sources["train"]
        results = []
        for image_size in args.image_sizes:
            for worker_count in args.worker_counts:
                for read_threads in args.read_threads:
                    row = measure_train_pipeline(
                        train, image_size=image_size, worker_count=worker_count, read_threads=read_threads,
                        batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                    )
                    row.update(image_size=image_size, worker_count=worker_count, read_threads=read_threads)
                    print(json.dumps(row), flush=True)
                    results.append(row)
        report = {
            "benchmark": "train pipeline (decode + 2 random-resized-crop/flip views, uint8)",
            "manual_dir": args.manual_dir,
            "train_examples": info.split_sizes["train"],
            "build_or_load_seconds": load_seconds,
            "source_decode_images_per_s": measure_source_decode(train, 500),
            "batch_size": args.batch_size,
            "steps": args.steps,
            "host_cpu_count": os.cpu_count(),
            "load_average_1_5_15min_at_end": os.getloadavg(),  # Other processes sharing the CPUs skew img/s.
            "platform": platform.platform(),
            "results": results,
        }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
