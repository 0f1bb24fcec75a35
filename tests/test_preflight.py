"""What the data decides is checked before step 1 (preflight.py), and a metric the data cannot define
is reported unavailable without losing the others (evaluate.compute_metrics)."""
import json
import os

import numpy as np
import pytest

from conftest import tiny_config, write_tiny_cub
from fgpair_jax import evaluate, preflight
from fgpair_jax.errors import ConfigError
from fgpair_jax.evaluation import MetricUnavailable, retrieval
from test_end_to_end import last_error_line, run_cli

TINY = "--config=configs/cub.py:tiny"


def facts(train_per_class=6, eval_per_class=3, classes=3):
    return preflight.DataFacts(np.repeat(np.arange(classes), train_per_class),
                               np.repeat(np.arange(classes), eval_per_class))


def one_line(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_a_batch_larger_than_the_train_split_is_one_line_before_step_1():
    with pytest.raises(ConfigError) as excinfo:
        preflight.check_errors(tiny_config(global_batch_size=32), facts())
    one_line(excinfo, "config.global_batch_size=32", "18 training images", "at most 18")


def test_an_empty_automatic_queue_names_a_size_that_works_not_the_automatic_one():
    config = tiny_config(global_batch_size=8, **{"moco.queue_size": 0})  # 0.5 * 18 // 8 * 8 = 8: fits
    preflight.check_errors(config, facts())
    with pytest.raises(ConfigError) as excinfo:  # 0.5 * 30 // 8 * 8 = 8 >= 8 would fit; 0.2 * 30 = 6 does not
        preflight.check_errors(tiny_config(**{"moco.queue_size": 0, "moco.queue_fraction": 0.2}), facts(10))
    one_line(excinfo, "automatic MoCo queue", "config.moco.queue_size", "e.g. 16")
    assert "0 for automatic" not in str(excinfo.value)
    with pytest.raises(ConfigError) as excinfo:  # 18 images: no safe queue of whole batches of 8 beyond one
        preflight.check_errors(tiny_config(global_batch_size=8, **{"moco.queue_size": 0, "moco.queue_fraction": 0.1}),
                               facts(4))
    one_line(excinfo, "12 train images hold fewer than three batches of 8", "lower config.global_batch_size")


def test_an_explicit_queue_as_large_as_the_data_is_a_warning():
    warnings = preflight.data_warnings(tiny_config(**{"moco.queue_size": 64}), facts())
    assert len(warnings) == 1 and "moco#87" in warnings[0] and "e.g. 8" in warnings[0], warnings
    assert preflight.data_warnings(tiny_config(), facts()) == []  # tiny's queue of 8 is below 18 - 8


def test_knn_k_and_bn_recalibration_beyond_the_train_split_are_errors_before_training():
    with pytest.raises(ConfigError) as excinfo:
        preflight.check_errors(tiny_config(**{"eval.knn_k": 50}), facts())
    one_line(excinfo, "config.eval.knn_k=50", "at most 18")
    with pytest.raises(ConfigError) as excinfo:
        preflight.check_errors(tiny_config(**{"eval.recompute_bn_stats": True, "eval.batch_size": 32}), facts())
    one_line(excinfo, "config.eval.recompute_bn_stats", "at most 18")


def test_singleton_eval_classes_and_an_empty_probe_validation_part_are_predicted():
    warnings = preflight.data_warnings(tiny_config(**{"data.eval_split": "val"}), facts(6, 1))
    assert len(warnings) == 1 and "retrieval will be reported unavailable" in warnings[0], warnings
    assert "config.data.val_fraction" in warnings[0]
    warnings = preflight.data_warnings(tiny_config(**{"eval.probe_val_fraction": 0.01}), facts())
    assert len(warnings) == 1 and "linear probe" in warnings[0] and "probe_val_fraction" in warnings[0]


def test_lcr_on_a_one_pixel_wide_feature_map_is_a_warning():
    (warning,) = preflight.model_warnings(tiny_config(method="lcr"))  # resnet_tiny at 32 px: a 1x1 map
    assert "1x1" in warning and "identically 0" in warning and "config.data.image_size" in warning
    assert preflight.model_warnings(tiny_config(method="lcr", **{"data.image_size": 64})) == []  # 2x2
    assert preflight.model_warnings(tiny_config(method="moco")) == []


def test_a_metric_that_cannot_be_computed_is_unavailable_and_the_others_are_kept():
    rng = np.random.default_rng(0)
    train_labels, test_labels = np.repeat(np.arange(4), 8), np.arange(4)  # one test image per class
    metrics = evaluate.compute_metrics(rng.normal(size=(32, 6)).astype(np.float32), train_labels,
                                       rng.normal(size=(4, 6)).astype(np.float32), test_labels,
                                       tiny_config(), num_classes=4)
    assert metrics["retrieval_rank1"] is None and metrics["retrieval_map"] is None
    assert 0 <= metrics["linear_top1"] <= 100 and 0 <= metrics["knn_top1"] <= 100
    assert set(metrics["unavailable"]) == {"retrieval"} and "two or more images" in metrics["unavailable"]["retrieval"]
    assert "retrieval_rank1" not in evaluate.scalar_metrics(metrics)
    line = evaluate.summary_line(metrics)
    assert "retrieval_rank1 n/a" in line and "Warning: retrieval unavailable" in line
    with pytest.raises(MetricUnavailable):
        retrieval.retrieval_metrics(np.eye(3, dtype=np.float32), np.arange(3))


def test_cli_batch_larger_than_the_data_is_error_exit_2_before_training(tiny_cub, tmp_path):
    result = run_cli(TINY, "--config.global_batch_size=64", f"--config.data.manual_dir={tiny_cub}",
                     f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert last_error_line(result).startswith("error: config.global_batch_size=64 exceeds the 18 training images")
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints") or not os.listdir(tmp_path / "run" / "checkpoints")


def test_cli_val_split_with_one_image_per_class_writes_every_other_metric(tmp_path):
    folder = write_tiny_cub(str(tmp_path / "CUB_200_2011"), train_per_class=5, test_per_class=1)
    workdir = tmp_path / "run"
    result = run_cli(TINY, "--config.data.eval_split=val", "--config.data.val_fraction=0.2",
                     "--config.eval.knn_k=3", f"--config.data.manual_dir={folder}", f"--workdir={workdir}",
                     "--config.method=moco", "--config.eval.figures=false")  # the split is method-agnostic
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.index("Warning: retrieval will be reported unavailable") < output.index("Training ")
    with open(workdir / "eval" / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["retrieval_rank1"] is None and "retrieval" in metrics["unavailable"]
    assert 0 <= metrics["linear_top1"] <= 100 and 0 <= metrics["knn_top1"] <= 100
