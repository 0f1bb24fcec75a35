"""Precise BatchNorm statistics for evaluation (`eval.recompute_bn_stats`, off by default): the
encoder's running statistics recomputed on clean (evaluation-transformed) train images, as the plain
average of per-batch statistics. Train images only: the test split stays out of every choice.

Why it exists: during SSL the running statistics follow the strongly augmented training batches,
and in the quick config that alone explains the drop below the ImageNet start: on the validation
split a MoCo run whose encoder weights never moved (`optim.encoder_lr_scale=0`) fell from 84.0 to
78.3 linear top-1 and from 45.0 to 38.0 retrieval rank-1 (results/val_study/). What we measured
with it, on that split: it does NOT restore the start. Recomputed on clean CUB train images, the
ImageNet encoder scores 58.3 linear / 16.7 R@1 and the MoCo run 61.3 / 18.7: features normalised
with CUB statistics (they agree with the train-mode features, cosine 0.94) are far worse for these
probes than features normalised with ImageNet's statistics (cosine 0.43 to the train-mode ones). So
for ImageNet-initialised quick runs the statistics to keep are ImageNet's; this stays an option for
encoders trained from scratch, where precise statistics are the usual remedy for running averages
that lag the weights.

The encoder modules are not changed: a train-mode pass updates each statistic to
m * old + (1 - m) * batch, so a pass from all-zero statistics gives (1 - m) * batch, and m per layer
is read once by also passing from all-one statistics. That is safe for the updating layers only (they
normalise with the batch's own statistics in train mode); frozen modules (`model.frozen_stages`)
normalise with their running statistics even in train mode, so they keep theirs throughout.
"""
import jax
import jax.numpy as jnp

from fgpair_jax import parallel
from fgpair_jax.data import augment, pipeline
from fgpair_jax.methods import moco
from fgpair_jax.models import frozen_modules, input_normalization


def make_statistics_fn(config, mesh):
    """Jitted (params, encoder batch_stats, uint8 images) -> the encoder's statistics after one
    train-mode update from `batch_stats` on those images."""
    mean, std = input_normalization(config.model)

    def updated(params, encoder_stats, images):
        _, new_stats = moco.encode(params, {"encoder": encoder_stats}, augment.normalize(images, mean, std),
                                   config, train=True)
        return new_stats

    return jax.jit(updated, in_shardings=(parallel.replicated(mesh),) * 2 + (parallel.batch_sharded(mesh),),
                   out_shardings=parallel.replicated(mesh))


def recalibrated_batch_stats(params, batch_stats, source, config, mesh) -> dict:
    """`batch_stats` with the encoder's updating statistics replaced by their average over the full
    `eval.batch_size` batches of `source` (normally the train split); the partial last batch is left out."""
    num_batches = len(source) // config.eval.batch_size
    if num_batches == 0:
        raise ValueError(f"eval.recompute_bn_stats needs at least eval.batch_size={config.eval.batch_size} train "
                         f"images, the split has {len(source)}; lower config.eval.batch_size.")
    statistics_fn = make_statistics_fn(config, mesh)
    frozen = frozen_modules(config.model)
    old_stats = batch_stats["encoder"]

    def starting_from(value):  # `value` in every updating layer; frozen modules keep their statistics
        return {name: stats if name in frozen else jax.tree.map(lambda x: jnp.full_like(x, value), stats)
                for name, stats in old_stats.items()}

    zeros, ones = starting_from(0.0), starting_from(1.0)
    batches = pipeline.eval_batches(source, batch_size=config.eval.batch_size, image_size=config.data.image_size,
                                    process_index=jax.process_index(), process_count=jax.process_count(),
                                    worker_count=config.data.worker_count)
    total, momentum = None, None
    for index, batch in zip(range(num_batches), batches):
        images = parallel.global_batch({"image": batch["image"]}, mesh)["image"]
        scaled = statistics_fn(params, zeros, images)  # (1 - m) * this batch's statistics
        if index == 0:
            momentum = jax.tree.map(jnp.subtract, statistics_fn(params, ones, images), scaled)
        total = scaled if total is None else jax.tree.map(jnp.add, total, scaled)

    average = lambda summed, m: summed / (num_batches * (1.0 - m))  # noqa: E731
    encoder_stats = {name: stats if name in frozen else jax.tree.map(average, total[name], momentum[name])
                     for name, stats in old_stats.items()}
    return {**batch_stats, "encoder": encoder_stats}
