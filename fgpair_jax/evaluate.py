"""Evaluation of a frozen encoder: features -> linear probe, retrieval, kNN -> `<workdir>/eval/`.

Writes `eval/metrics.json` (linear_top1, retrieval_rank1, retrieval_rank5, retrieval_map, knn_top1, in
percent, plus the step and the probe's chosen weight decay) and `eval/features.npz` (train/test pooled
features before normalisation, with labels). Both are written to a temporary file and renamed, so a
crash never leaves a half-written result.

CLI: `python -m fgpair_jax.evaluate --workdir=W` re-evaluates the latest checkpoint of W with the
config W/config.json that training saved.
"""
import json
import os

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from fgpair_jax import parallel
from fgpair_jax.atomic_files import write_atomically
from fgpair_jax.data import augment, pipeline, sources as data_sources
from fgpair_jax.evaluation.bn_recalibration import recalibrated_batch_stats
from fgpair_jax.evaluation.knn import knn_top1
from fgpair_jax.evaluation.linear_probe import GRID_BEFORE_ZERO_WAS_DROPPED, linear_probe
from fgpair_jax.evaluation.retrieval import retrieval_metrics
from fgpair_jax.methods import get_method
from fgpair_jax.models import input_normalization


def make_feature_fn(config, mesh):
    """Jitted images(uint8, sharded) -> features; weights replicated, batch split over the mesh."""
    method = get_method(config.method)
    mean, std = input_normalization(config.model)

    def features(params, batch_stats, images):
        return method.eval_features(params, batch_stats, augment.normalize(images, mean, std), config)

    return jax.jit(
        features,
        in_shardings=(parallel.replicated(mesh),) * 2 + (parallel.batch_sharded(mesh),),
        out_shardings=parallel.replicated(mesh),
    )


def extract_features(feature_fn, params, batch_stats, source, config, mesh):
    """(features [N, D] float32, labels [N] int32) of every example of `source`, in source order."""
    batches = pipeline.eval_batches(
        source,
        batch_size=config.eval.batch_size,
        image_size=config.data.image_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        worker_count=config.data.worker_count,
    )
    features, labels, indices = [], [], []
    for batch in batches:
        images = parallel.global_batch({"image": batch["image"]}, mesh)["image"]
        out = np.asarray(jax.device_get(feature_fn(params, batch_stats, images)))
        # Every process sees the replicated global result; keep the valid rows of the global batch.
        meta = jax.experimental.multihost_utils.process_allgather(
            {"label": batch["label"], "mask": batch["mask"], "index": batch["index"]}, tiled=True
        ) if jax.process_count() > 1 else batch
        valid = np.asarray(meta["mask"])
        features.append(out[valid])
        labels.append(np.asarray(meta["label"])[valid])
        indices.append(np.asarray(meta["index"])[valid])
    order = np.argsort(np.concatenate(indices), kind="stable")
    return np.concatenate(features)[order].astype(np.float32), np.concatenate(labels)[order].astype(np.int32)


def compute_metrics(train_features, train_labels, test_features, test_labels, config, num_classes) -> dict:
    """The five headline numbers (percent) from frozen features; the test split chooses nothing."""
    probe = linear_probe(
        train_features, train_labels, test_features, test_labels,
        num_classes=num_classes, val_fraction=config.eval.probe_val_fraction, seed=config.seed,
        weight_decays=tuple(config.eval.probe_weight_decays),
    )
    retrieval = retrieval_metrics(test_features, test_labels)
    knn = knn_top1(
        train_features, train_labels, test_features, test_labels,
        k=config.eval.knn_k, temperature=config.eval.knn_temperature, num_classes=num_classes,
    )
    return {
        "linear_top1": probe["top1"],
        "retrieval_rank1": retrieval["rank1"],
        "retrieval_rank5": retrieval["rank5"],
        "retrieval_map": retrieval["map"],
        "knn_top1": knn,
        "linear_val_top1": probe["val_top1"],
        "linear_weight_decay": probe["weight_decay"],
    }


def knn_monitor(feature_fn, state, sources, config, mesh, num_classes) -> float:
    """Weighted kNN top-1 (percent): the cheap quality signal logged during training."""
    train = extract_features(feature_fn, state.params, state.batch_stats, sources["train"], config, mesh)
    test = extract_features(feature_fn, state.params, state.batch_stats, sources["test"], config, mesh)
    return knn_top1(*train, *test, k=config.eval.knn_k, temperature=config.eval.knn_temperature,
                    num_classes=num_classes)


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
    feature_fn = make_feature_fn(config, mesh)
    batch_stats = state.batch_stats
    if config.eval.recompute_bn_stats:
        batch_stats = recalibrated_batch_stats(state.params, batch_stats, sources["train"], config, mesh)
    train = extract_features(feature_fn, state.params, batch_stats, sources["train"], config, mesh)
    test = extract_features(feature_fn, state.params, batch_stats, sources["test"], config, mesh)
    metrics = compute_metrics(*train, *test, config, info.num_classes)
    metrics["step"] = int(jax.device_get(state.step))
    write_results(workdir, metrics, train, test)
    return metrics


# Config keys added after runs were first saved, with the value that reproduces what those runs did
# (not today's default), so that older workdirs re-evaluate unchanged.
KEYS_ADDED_SINCE = {
    "data.eval_split": "test",
    "data.val_fraction": 0.1,
    "optim.encoder_lr_scale": 1.0,
    "eval.probe_weight_decays": GRID_BEFORE_ZERO_WAS_DROPPED,
    "eval.recompute_bn_stats": False,
    "model.keep_bn_stats": False,
}


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run saved in `<workdir>/config.json`, keys it predates filled in."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: --workdir must be a directory written by `python -m fgpair_jax.main`."
        )
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    for dotted, value in KEYS_ADDED_SINCE.items():
        *parents, leaf = dotted.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        if leaf not in node:
            node[leaf] = value
    return config


def evaluate_workdir(workdir: str) -> dict:
    """Re-evaluate the latest checkpoint of a run directory into its `eval/` files."""
    from fgpair_jax import train  # the trainer owns how a state is built and restored

    config = load_run_config(workdir)
    mesh = parallel.make_mesh()
    sources, info = data_sources.load_sources(config, workdir)
    state = train.restore_latest_state(config, workdir, info, mesh)
    return evaluate_state(config, workdir, state, sources, info, mesh)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}.")
    metrics = evaluate_workdir(flags.FLAGS.workdir)
    logging.info("Evaluation: %s", json.dumps(metrics))
    print(json.dumps(metrics, indent=2, sort_keys=True))


if __name__ == "__main__":
    # Defined here, not at import: fgpair_jax.main imports this module and has its own --workdir.
    flags.DEFINE_string("workdir", None, "Run directory written by fgpair_jax.main.", required=True)
    app.run(main)
