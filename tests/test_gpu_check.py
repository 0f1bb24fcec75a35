"""benchmarks/gpu_check.py rehearsed on CPU, as CI runs it: `--smoke`, then `--smoke --paper_table`.

The GPU check is one prepared command for a few lent minutes; this keeps it from rotting. Both modes
run as subprocesses (the command a user types) and their JSONs are checked for what a GPU run must
say: environment, step compile/rate/FLOPs/memory, the input pipeline, and a training run whose
contrastive loss fell with no non-finite step; then the table's sizing and per-method metrics.
One test, two runs in order: the table reuses the check's compiled step programs through the test
session's compilation cache (conftest.py), which halves its time. No timing is asserted: numbers come
from benchmarks, never from timed tests.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO
from fgpair_jax.evaluation import HEADLINE_METRICS

SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")
HEADLINE = tuple(HEADLINE_METRICS)


def run_gpu_check(out, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # keeps conftest's JAX_COMPILATION_CACHE_DIR
    result = subprocess.run([sys.executable, SCRIPT, "--smoke", f"--out={out}", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_training_run(run):
    assert run["error"] is None
    assert run["log"]["nonfinite_steps"] == []
    assert run["log"]["logged_steps"] > 0
    for name in HEADLINE:
        assert 0.0 <= run["metrics"][name] <= 100.0, (name, run["metrics"])
    assert positive(run["wall_seconds"])


@pytest.mark.slow
def test_smoke_check_then_paper_table(tmp_path):
    report = run_gpu_check(tmp_path / "check.json")
    assert report["complete"] and report["mode"] == "check" and report["smoke"]
    assert report["backend"] == "cpu" and report["device_count"] >= 1 and report["jax_version"]
    assert report["bf16_dense_peak_flops_per_device"] is None  # CPU is not in the peak table: MFU null
    assert "gpu_check.py" in report["command"] and "--smoke" in report["command"]
    assert report["config_overrides"]["script"]["model.name"] == "resnet_tiny"

    pipeline = report["input_pipeline"]
    assert pipeline["image_size"] == 224 and pipeline["worker_count"] == os.cpu_count()
    assert positive(pipeline["images_per_second"])
    assert pipeline["all_cores_fast"]["worker_count"] == os.cpu_count()  # the decoded cache, shared with workers
    assert positive(pipeline["all_cores_fast"]["images_per_second"])
    for name in ("default", "fast"):
        assert positive(pipeline["per_core"][name]["images_per_cpu_second"]), name

    steps = report["steps"]
    for method in ("moco", "fgpair"):
        record = steps[method]["8"]
        for key in ("compile_seconds", "seconds_per_step", "images_per_second", "flops_per_step_per_device",
                    "flops_per_image"):
            assert positive(record[key]), (method, key, record[key])
        assert record["all_timed_steps_finite"]
        assert positive(record["host_cores_needed"]["default"]) and positive(record["host_cores_needed"]["fast"])
        assert positive(record["compiled_memory_bytes"]["total_bytes"])
        assert record["mfu"] is None and record["device_memory_after"]["peak_bytes_in_use"] is None
        loops = record["while_loops"]  # only RNG loops, which cost analysis may count once
        assert loops["lowered_threefry_shaped_count"] == loops["lowered_count"]
        assert loops["lowered_largest_carry_elements"] < 10_000
    assert steps["fgpair"]["8"]["flops_per_image"] > steps["moco"]["8"]["flops_per_image"]

    run = report["training_run"]
    check_training_run(run)
    assert run["method"] == "fgpair" and run["epochs"] == 10
    assert run["log"]["loss_fell"] is True, run["log"]
    assert run["log"]["loss_contrastive_late"] < run["log"]["loss_contrastive_early"]
    assert run["compilation_cache"]["hits"] >= 1  # its step program is the benchmarked one

    # The smallest budget: every run gets the one epoch the sizing rule never goes below.
    table = run_gpu_check(tmp_path / "table.json", "--paper_table", "--minutes=0.1")
    assert table["complete"] and table["mode"] == "paper_table"
    sizing = table["sizing"]
    assert 1 <= sizing["epochs"] <= sizing["config_epochs"]
    for method in ("moco", "fgpair"):
        assert positive(sizing["probes"][method]["seconds_per_step"])
        run = table["methods"][method]
        check_training_run(run)
        assert run["epochs"] == sizing["epochs"]
    assert set(table["fgpair_minus_moco"]) == set(HEADLINE)
    assert table["init"]["error"] is None and table["init"]["epochs"] == 0
    assert positive(table["wall_seconds"])
