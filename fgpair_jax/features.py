"""The frozen encoder's passes over a data split: feature extraction, the kNN monitor during training,
and batch-norm recalibration (precise BN) for evaluation. Everything that runs the encoder over a
whole split lives here; `evaluation/` holds the pure metrics of the features these passes return.

Every pass reads the split with `pipeline.eval_batches` (each image once, centre-cropped by
`data.eval_crop_fraction`, padded to whole batches and masked), places the batch sharded over the mesh
and keeps the weights replicated. The batch is `eval.batch_size` rounded up to a multiple of the device
count (`eval_batch_size`), so evaluation runs on any number of devices: the extra rows are padding.

Precise BN (`eval.recompute_bn_stats`, off by default): the encoder's running statistics recomputed on
clean train images, as the plain average of per-batch statistics (train images only: the test split
stays out of every choice). During SSL the running statistics follow the strongly augmented training
batches; for encoders trained from scratch recomputing them is the usual remedy. For an ImageNet start
it hurts, and keeping ImageNet's statistics (`model.keep_bn_stats`) is what helps (results/README.md).
The encoder modules are not changed: a train-mode pass updates each statistic to m * old + (1 - m) * batch,
so a pass from all-zero statistics gives (1 - m) * batch, and m per layer is read once by also passing
from all-one statistics. That holds for the updating layers only (they normalise with the batch's own
statistics in train mode); frozen modules (`model.frozen_stages`) normalise with their running
statistics even in train mode, so they keep theirs throughout.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from fgpair_jax import parallel
from fgpair_jax.data import augment, nuisance, pipeline
from fgpair_jax.evaluation.knn import knn_top1
from fgpair_jax.errors import ConfigError
from fgpair_jax.methods import get_method
from fgpair_jax.metrics_writer import announce, phase_bar
from fgpair_jax.models import build_encoder, frozen_modules, input_normalization


def eval_batch_size(config) -> int:
    """`config.eval.batch_size` rounded up to a multiple of the device count: a batch is split evenly over
    the mesh (and over processes), and the rows past the data are masked padding."""
    devices = jax.device_count()
    return -(-config.eval.batch_size // devices) * devices


def announce_eval_batch_size(config) -> None:
    """Say so at start-up when `eval_batch_size` is not `config.eval.batch_size`."""
    size = eval_batch_size(config)
    if size != config.eval.batch_size:
        announce(f"Evaluation batch: config.eval.batch_size={config.eval.batch_size} rounded up to {size}, a "
                 f"multiple of the {jax.device_count()} devices (the added rows are masked padding).")


def batch_count(source, config) -> int:
    """How many global batches `split_batches` yields for `source`: its length over `eval_batch_size`, rounded up."""
    return -(-len(source) // eval_batch_size(config))


def split_batches(source, config, split: str = "test"):
    """This process's share of every global evaluation batch of `source` (`pipeline.eval_batches`), the
    `split` ("train" or "test": the one SSL trains on, or the evaluated one) naming whose images these are,
    so that each carries its own nuisance when `config.nuisance` is on (`data/nuisance.py`)."""
    return pipeline.eval_batches(
        source, batch_size=eval_batch_size(config), image_size=config.data.image_size,
        crop_fraction=config.data.eval_crop_fraction, process_index=jax.process_index(),
        process_count=jax.process_count(), worker_count=config.data.worker_count,
        nuisance=nuisance.Nuisance.of_config(config), nuisance_stream=nuisance.stream_of(split))


def closing_batches(source, config, split: str = "test") -> pipeline.ClosingIterator:
    """`split_batches` as an iterator closed on leaving its `with` block (`pipeline.ClosingIterator`): grain's
    worker processes stop when the pass ends, not at the interpreter's exit."""
    return pipeline.ClosingIterator(split_batches(source, config, split))


def _on_mesh(fn, mesh, batch_args: int = 1):
    """`fn(params, batch_stats, *batch)` jitted: weights replicated, the `batch_args` per-image arrays split
    over the mesh."""
    return jax.jit(fn, in_shardings=(parallel.replicated(mesh),) * 2 + (parallel.batch_sharded(mesh),) * batch_args,
                   out_shardings=parallel.replicated(mesh))


def encoder_features(config, params, batch_stats, images, valid):
    """[B, D] float features of the method's frozen encoder (`Method.eval_features`) for uint8 images
    [B, S, S, 3]; `valid` (bool [B]) is False on the padding rows."""
    mean, std = input_normalization(config.model)
    return get_method(config.method).eval_features(params, batch_stats, augment.normalize(images, mean, std), config,
                                                   valid=valid)


def make_feature_fn(config, mesh):
    """Jitted (params, batch_stats, uint8 images [B, S, S, 3], valid bool [B]) -> [B, D] float features
    (`encoder_features`), compiled once per batch shape: every batch of `split_batches` has one shape (the
    last one padded and masked), and the jitted function is the module-level `encoder_features` with the
    config a static (frozen, hashable) argument, so every feature function of an equal config and mesh (the
    kNN monitor's during training, the final evaluation's; train and test splits) shares JAX's compiled
    program instead of compiling its own."""
    jitted = jax.jit(encoder_features, static_argnums=0,
                     in_shardings=(parallel.replicated(mesh),) * 2 + (parallel.batch_sharded(mesh),) * 2,
                     out_shardings=parallel.replicated(mesh))
    return functools.partial(jitted, ml_collections.FrozenConfigDict(config))


def extract_features(feature_fn, params, batch_stats, source, config, mesh, split: str = "test",
                     transient: bool = False):
    """(features [N, D] float32, labels [N] int32) of every example of `source` (the `split` named, see
    `split_batches`), in source order. A bar counts the batches (`metrics_writer.phase_bar`; the first one
    includes the compile); `transient` erases it when done (the kNN monitor's, under the training bar)."""
    features, labels, indices = [], [], []
    with (phase_bar(batch_count(source, config), f"Extracting {split} features", "batch", transient=transient) as bar,
          closing_batches(source, config, split) as batches):
        for batch in batches:
            placed = parallel.global_batch({"image": batch["image"], "mask": batch["mask"]}, mesh)
            out = np.asarray(jax.device_get(feature_fn(params, batch_stats, placed["image"], placed["mask"])))
            # Every process sees the replicated global result; keep the valid rows of the global batch.
            meta = {"label": batch["label"], "mask": batch["mask"], "index": batch["index"]}
            if jax.process_count() > 1:
                meta = multihost_utils.process_allgather(meta, tiled=True)
            valid = np.asarray(meta["mask"])
            features.append(out[valid])
            labels.append(np.asarray(meta["label"])[valid])
            indices.append(np.asarray(meta["index"])[valid])
            bar.update()
    order = np.argsort(np.concatenate(indices), kind="stable")
    return np.concatenate(features)[order].astype(np.float32), np.concatenate(labels)[order].astype(np.int32)


def knn_monitor(feature_fn, state, sources, config, mesh, num_classes) -> float:
    """Weighted kNN top-1 (percent) of `state`'s encoder, train -> eval split: the cheap quality signal
    logged during training."""
    train = extract_features(feature_fn, state.params, state.batch_stats, sources["train"], config, mesh, "train",
                             transient=True)
    test = extract_features(feature_fn, state.params, state.batch_stats, sources["test"], config, mesh, "test",
                            transient=True)
    return knn_top1(*train, *test, k=config.eval.knn_k, temperature=config.eval.knn_temperature,
                    num_classes=num_classes)


def make_statistics_fn(config, mesh):
    """Jitted (params, encoder batch_stats, uint8 images) -> the encoder's statistics after one
    train-mode update from `batch_stats` on those images."""
    mean, std = input_normalization(config.model)
    encoder = build_encoder(config.model)

    def updated(params, encoder_stats, images):
        variables = {"params": params["encoder"], "batch_stats": encoder_stats}
        _, new = encoder.apply(variables, augment.normalize(images, mean, std), train=True, mutable=["batch_stats"])
        return new["batch_stats"]

    return _on_mesh(updated, mesh)


def recalibrated_batch_stats(params, batch_stats, source, config, mesh) -> dict:
    """`batch_stats` with the encoder's updating statistics replaced by their average over the full
    `eval_batch_size` batches of `source` (normally the train split); the partial last batch is left out.
    Raises `ConfigError` when `source` holds fewer than one batch."""
    batch_size = eval_batch_size(config)
    full_batches = len(source) // batch_size
    if full_batches == 0:
        raise ConfigError(f"eval.recompute_bn_stats needs at least {batch_size} train images (eval.batch_size="
                          f"{config.eval.batch_size} on {jax.device_count()} devices), the split has "
                          f"{len(source)}; lower config.eval.batch_size.")
    statistics_fn = make_statistics_fn(config, mesh)
    frozen = frozen_modules(config.model)
    old_stats = batch_stats["encoder"]

    def starting_from(value):  # `value` in every updating layer; frozen modules keep their statistics
        return {name: stats if name in frozen else jax.tree.map(lambda x: jnp.full_like(x, value), stats)
                for name, stats in old_stats.items()}

    zeros, ones = starting_from(0.0), starting_from(1.0)
    total, momentum = None, None
    with (phase_bar(full_batches, "Recomputing batch-norm statistics", "batch") as bar,
          closing_batches(source, config, "train") as batches):
        for index, batch in zip(range(full_batches), batches):
            images = parallel.global_batch({"image": batch["image"]}, mesh)["image"]
            scaled = statistics_fn(params, zeros, images)  # (1 - m) * this batch's statistics
            if index == 0:
                momentum = jax.tree.map(jnp.subtract, statistics_fn(params, ones, images), scaled)
            total = scaled if total is None else jax.tree.map(jnp.add, total, scaled)
            bar.update()

    def average(summed, m):
        return summed / (full_batches * (1.0 - m))

    encoder_stats = {name: stats if name in frozen else jax.tree.map(average, total[name], momentum[name])
                     for name, stats in old_stats.items()}
    return {**batch_stats, "encoder": encoder_stats}
