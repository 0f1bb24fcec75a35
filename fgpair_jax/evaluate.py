"""Evaluation of a frozen encoder: features -> linear probe, retrieval, kNN -> `<workdir>/eval/`.

Writes `eval/metrics.json` (the `evaluation.HEADLINE_METRICS`, in percent, plus the checkpoint step scored,
the probe's chosen weight decay and the `evaluation_config` it was scored under; a metric the data cannot
define is null, its reason under "unavailable") and `eval/features.npz` (train/test pooled features before
normalisation, with labels). Both are written to a temporary file and renamed, so a crash never leaves a
half-written result. Each phase says what it does on the console: a bar over the feature batches of each
split and over the probe's fits, then the summary line, the step scored and the files written.

CLI: `python -m fgpair_jax.evaluate --workdir=W [--force] [--config.key=value ...]` re-evaluates the latest
checkpoint of W with the config W/config.json that training saved; overrides may change evaluation
knobs and data paths (e.g. `--config.data.manual_dir=` after the data folder moved), nothing trained. It reads only W: no pretrained weights, no optimiser. Like
training, it joins the multi-process job its launcher describes (`distributed.py`), on any device count.
When W/eval/metrics.json already scores W's latest checkpoint under the same evaluation config
(`current_metrics`), it says so in one line and exits without work; `--force` re-evaluates anyway.

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

from fgpair_jax import checkpointing, cli, compilation_cache, distributed, features, parallel, run, run_config
from fgpair_jax.atomic_files import write_atomically
from fgpair_jax.data import sources as data_sources
from fgpair_jax.evaluation import HEADLINE_METRICS, MetricUnavailable
from fgpair_jax.evaluation.knn import knn_top1
from fgpair_jax.evaluation.linear_probe import linear_probe
from fgpair_jax.evaluation.retrieval import retrieval_metrics
from fgpair_jax.metrics_writer import announce, phase_bar

METRICS_FILE = os.path.join("eval", "metrics.json")
# What `evaluation_config` leaves out of the `eval.` keys: what changes no number of metrics.json (the kNN
# monitor's cadence during training, whether figures are drawn).
NOT_EVALUATION = ("eval.knn_every_epochs", "eval.figures")


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
    weight_decays = tuple(config.eval.probe_weight_decays)
    with phase_bar(len(weight_decays) + 1, "Fitting the linear probe", "fit") as bar:  # one fit per decay + refit
        probe = _available(lambda: linear_probe(
            train_features, train_labels, test_features, test_labels,
            num_classes=num_classes, val_fraction=config.eval.probe_val_fraction, seed=config.seed,
            weight_decays=weight_decays, after_fit=bar.update,
        ), unavailable, "linear_probe") or {}
    announce("Scoring retrieval (leave-one-out) and kNN ...")
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


def evaluation_config(config) -> dict:
    """{"eval.knn_k": 20, ...}: the config keys an evaluation's numbers depend on beyond the trained state (the
    `eval.` knobs but `NOT_EVALUATION`, and `data.eval_crop_fraction`), values as JSON gives them back."""
    return {key: value for key, value in run_config.flatten(config).items()
            if (key.startswith("eval.") and key not in NOT_EVALUATION) or key == "data.eval_crop_fraction"}


def metrics_path(workdir: str) -> str:
    return os.path.join(workdir, METRICS_FILE)


def read_metrics(workdir: str):
    """The dict in `<workdir>/eval/metrics.json`, or None when there is none or it does not parse."""
    try:
        with open(metrics_path(workdir)) as f:
            metrics = json.load(f)
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def current_metrics(workdir: str, step: int, config):
    """The saved metrics when `<workdir>/eval/metrics.json` scores checkpoint `step` under `config`'s
    `evaluation_config`, else None. A file written before the step or the evaluation config were recorded
    in it is never current (it is re-evaluated once, and then records both)."""
    saved = read_metrics(workdir)
    if saved is None or saved.get("step") != step:
        return None
    return saved if saved.get("evaluation_config") == evaluation_config(config) else None


def latest_checkpoint_step(workdir: str):
    """The newest finished checkpoint step folder in `<workdir>/checkpoints` (a listing: nothing is read), or
    None. Evaluation restores it unless it is damaged (`checkpointing.Checkpointer.restore`)."""
    directory = os.path.join(workdir, "checkpoints")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    finished = [step for step, name in checkpointing.step_folders(names)
                if checkpointing.unfinished_reason(step, name) is None]
    return finished[0] if finished else None


def results_line(workdir: str, step: int, previous) -> str:
    """'Results of step N: <workdir>/eval/metrics.json and features.npz (replaced those of step M)'; `previous`:
    the metrics the files held before (None: none)."""
    line = f"Results of step {step}: {metrics_path(workdir)} and features.npz"
    if previous is None:
        return line
    before = previous.get("step")
    return line + (f" (replaced those of step {before})" if isinstance(before, int) else " (replaced earlier ones)")


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
    """Full evaluation of `state`'s encoder; writes the result files, says what it scored and wrote (the
    summary line, the step, the files and which earlier result they replaced) and returns the metrics."""
    step = int(jax.device_get(state.step))
    announce(f"Evaluating step {step}: features of {len(sources['train']):,} train and {len(sources['test']):,} "
             "eval images, the linear probe, retrieval and kNN ...")
    feature_fn = features.make_feature_fn(config, mesh)
    batch_stats = state.batch_stats
    if config.eval.recompute_bn_stats:
        batch_stats = features.recalibrated_batch_stats(state.params, batch_stats, sources["train"], config, mesh)
    train = features.extract_features(feature_fn, state.params, batch_stats, sources["train"], config, mesh, "train")
    test = features.extract_features(feature_fn, state.params, batch_stats, sources["test"], config, mesh, "test")
    metrics = compute_metrics(*train, *test, config, info.num_classes)
    metrics["step"] = step
    metrics["evaluation_config"] = evaluation_config(config)
    if metrics["linear_weight_decay_at_grid_edge"]:
        announce(f"Warning: the linear probe chose weight decay {metrics['linear_weight_decay']}, an edge of "
                 f"config.eval.probe_weight_decays={tuple(config.eval.probe_weight_decays)}; widen the grid.")
    previous = read_metrics(workdir)
    write_results(workdir, metrics, train, test)
    announce(summary_line(metrics))
    announce(results_line(workdir, step, previous))
    return metrics


def evaluate_workdir(workdir: str, config=None, force: bool = False) -> dict:
    """Re-evaluate the latest checkpoint of a run directory into its `eval/` files (every process of a
    multi-process job runs this; process 0 writes them). `config`: the run's saved config with
    `--config.` overrides of evaluation knobs and data paths (`run_config.with_evaluation_overrides`
    refuses any other); None evaluates as saved. Without `force`, a workdir whose metrics.json already
    scores its latest checkpoint under this evaluation config (`current_metrics`) is not evaluated again:
    one line says so, and the saved metrics are returned."""
    workdir = run_config.user_path(workdir)
    saved = run_config.load(workdir)
    config = saved if config is None else run_config.with_evaluation_overrides(saved, config)
    compilation_cache.enable(config.compilation_cache_dir)  # the training run's compiled evaluation pass
    distributed.maybe_initialize()
    latest = latest_checkpoint_step(workdir)
    current = None if force or latest is None else current_metrics(workdir, latest, config)
    if current is not None:
        announce(f"Already evaluated: step {latest}, the latest checkpoint, under this evaluation config: "
                 f"{summary_line(current)} ({metrics_path(workdir)}). Pass --force to re-evaluate.")
        return current
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
    evaluate_workdir(flags.FLAGS.workdir, given if given.keys() else None, force=flags.FLAGS.force)


if __name__ == "__main__":
    # Defined here, not at import: fgpair_jax.main imports modules that import this one.
    flags.DEFINE_string("workdir", None, "Run directory written by fgpair_jax.main.", required=True)
    flags.DEFINE_bool("force", False, "Re-evaluate even when eval/metrics.json already scores the latest "
                      "checkpoint under this evaluation config.")
    define_config_flag(sys.argv)
    cli.run(main)
