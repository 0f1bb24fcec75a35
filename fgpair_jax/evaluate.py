"""Evaluation of a frozen encoder: features -> linear probe, retrieval, kNN -> `<workdir>/eval/`.

Writes `eval/metrics.json` (the `evaluation.HEADLINE_METRICS`, in percent, plus the step and the probe's
chosen weight decay; a metric the data cannot define is null, its reason under "unavailable") and `eval/features.npz` (train/test pooled features before normalisation, with
labels). Both are written to a temporary file and renamed, so a crash never leaves a half-written result.

CLI: `python -m fgpair_jax.evaluate --workdir=W [--config.key=value ...]` re-evaluates the latest
checkpoint of W with the config W/config.json that training saved; overrides may change evaluation
knobs and data paths (e.g. `--config.data.manual_dir=` after the data folder moved), nothing trained. It reads only W: no pretrained weights, no optimiser. Like
training, it joins the multi-process job its launcher describes (`distributed.py`), on any device count.

A checkpoint of another project (MoCo v2's or LCR's release, ...) is scored into the same files by
`python -m fgpair_jax.evaluate_checkpoint` (`evaluate_checkpoint.py`).
"""
import json
import os
import sys

import jax
import numpy as np
import ml_collections
from absl import flags
from ml_collections import config_flags

from fgpair_jax import cli, distributed, features, parallel, run, run_config
from fgpair_jax.atomic_files import write_atomically
from fgpair_jax.data import sources as data_sources
from fgpair_jax.evaluation import HEADLINE_METRICS, MetricUnavailable
from fgpair_jax.evaluation.knn import knn_top1
from fgpair_jax.evaluation.linear_probe import linear_probe
from fgpair_jax.evaluation.retrieval import retrieval_metrics
from fgpair_jax.metrics_writer import announce


def _available(compute, unavailable: dict, family: str):
    """compute() or, if the data cannot define that metric (`MetricUnavailable`), None with the reason
    recorded under `unavailable[family]`: one metric that cannot be computed never loses the others."""
    try:
        return compute()
    except MetricUnavailable as reason:
        unavailable[family] = str(reason)
        return None


def compute_metrics(train_features, train_labels, test_features, test_labels, config, num_classes) -> dict:
    """The headline numbers (percent) from frozen features; the test split chooses nothing.

    A metric the data cannot define is None, with its one-line reason under "unavailable" ({family:
    reason}, family in linear_probe / retrieval / knn); the others are computed as usual."""
    unavailable = {}
    probe = _available(lambda: linear_probe(
        train_features, train_labels, test_features, test_labels,
        num_classes=num_classes, val_fraction=config.eval.probe_val_fraction, seed=config.seed,
        weight_decays=tuple(config.eval.probe_weight_decays),
    ), unavailable, "linear_probe") or {}
    retrieval = _available(lambda: retrieval_metrics(test_features, test_labels), unavailable, "retrieval") or {}
    knn = _available(lambda: knn_top1(
        train_features, train_labels, test_features, test_labels,
        k=config.eval.knn_k, temperature=config.eval.knn_temperature, num_classes=num_classes,
    ), unavailable, "knn")
    metrics = {
        "linear_top1": probe.get("top1"),
        "retrieval_rank1": retrieval.get("rank1"),
        "retrieval_rank5": retrieval.get("rank5"),
        "retrieval_map": retrieval.get("map"),
        "knn_top1": knn,
        "linear_val_top1": probe.get("val_top1"),
        "linear_weight_decay": probe.get("weight_decay"),
        "linear_weight_decay_at_grid_edge": bool(probe.get("at_grid_edge", False)),
    }
    if unavailable:
        metrics["unavailable"] = unavailable
    return metrics


def scalar_metrics(metrics: dict) -> dict:
    """The numeric entries of a metrics dict (no None, no "unavailable"): what logs and tables take."""
    return {key: value for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def summary_line(metrics: dict) -> str:
    """'Evaluation (%): linear_top1 81.20, retrieval_rank1 n/a, ...' with each unavailable family's reason."""
    cells = [f"{key} {'n/a' if metrics.get(key) is None else format(metrics[key], '.2f')}" for key in HEADLINE_METRICS]
    line = "Evaluation (%): " + ", ".join(cells)
    for family, reason in metrics.get("unavailable", {}).items():
        line += f"\nWarning: {family} unavailable: {reason}."
    return line


def write_results(workdir: str, metrics: dict, train, test) -> None:
    """`eval/metrics.json` and `eval/features.npz` (process 0 only)."""
    if jax.process_index() != 0:
        return
    eval_dir = os.path.join(workdir, "eval")
    os.makedirs(eval_dir, exist_ok=True)

    def write_features(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, train_features=train[0], train_labels=train[1], test_features=test[0],
                     test_labels=test[1])

    def write_metrics(tmp):
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
            f.write("\n")

    write_atomically(os.path.join(eval_dir, "features.npz"), write_features)
    write_atomically(os.path.join(eval_dir, "metrics.json"), write_metrics)


def evaluate_state(config, workdir: str, state, sources, info, mesh) -> dict:
    """Full evaluation of `state`'s encoder; writes the result files and returns the metrics."""
    feature_fn = features.make_feature_fn(config, mesh)
    batch_stats = state.batch_stats
    if config.eval.recompute_bn_stats:
        batch_stats = features.recalibrated_batch_stats(state.params, batch_stats, sources["train"], config, mesh)
    train = features.extract_features(feature_fn, state.params, batch_stats, sources["train"], config, mesh, "train")
    test = features.extract_features(feature_fn, state.params, batch_stats, sources["test"], config, mesh, "test")
    metrics = compute_metrics(*train, *test, config, info.num_classes)
    metrics["step"] = int(jax.device_get(state.step))
    if metrics["linear_weight_decay_at_grid_edge"]:
        announce(f"Warning: the linear probe chose weight decay {metrics['linear_weight_decay']}, an edge of "
                 f"config.eval.probe_weight_decays={tuple(config.eval.probe_weight_decays)}; widen the grid.")
    write_results(workdir, metrics, train, test)
    return metrics


def evaluate_workdir(workdir: str, config=None) -> dict:
    """Re-evaluate the latest checkpoint of a run directory into its `eval/` files (every process of a
    multi-process job runs this; process 0 writes them). `config`: the run's saved config with
    `--config.` overrides of evaluation knobs and data paths (`run_config.with_evaluation_overrides`
    refuses any other); None evaluates as saved."""
    workdir = run_config.user_path(workdir)
    saved = run_config.load(workdir)
    config = saved if config is None else run_config.with_evaluation_overrides(saved, config)
    distributed.maybe_initialize()
    mesh = parallel.make_mesh()
    features.announce_eval_batch_size(config)
    sources, info = data_sources.load_sources(config, workdir)
    state = run.restore_latest(config, workdir, info.split_sizes["train"], mesh)
    return evaluate_state(config, workdir, state, sources, info, mesh)


def define_config_flag(argv) -> None:
    """`--config.key=value` overrides of the saved `<workdir>/config.json`, typed as ml_collections types
    them: `--workdir` is read first (absl's known-only parse) to find that config. Without a readable
    one the flag holds an empty config, and `evaluate_workdir` says what is missing."""
    try:
        flags.FLAGS(argv, known_only=True)
        saved = run_config.load(run_config.user_path(flags.FLAGS.workdir))
    except Exception:  # noqa: BLE001 -- a missing --workdir or config.json is reported by main, in one line
        saved = ml_collections.ConfigDict()
    flags.FLAGS.unparse_flags()
    config_flags.DEFINE_config_dict("config", saved, "The run's saved config; override evaluation knobs and data "
                                    "paths with --config.key=value.", lock_config=True)


def main(argv):
    del argv
    given = flags.FLAGS.config
    metrics = evaluate_workdir(flags.FLAGS.workdir, given if given.keys() else None)
    if jax.process_index() == 0:
        print(json.dumps(metrics, indent=2, sort_keys=True))


if __name__ == "__main__":
    # Defined here, not at import: fgpair_jax.main imports modules that import this one.
    flags.DEFINE_string("workdir", None, "Run directory written by fgpair_jax.main.", required=True)
    define_config_flag(sys.argv)
    cli.run(main)
