"""The training state: one pytree holding everything the next step depends on.

Saving this pytree (plus the data iterator position, which is a function of `step`) is enough to
resume a run exactly: see `checkpointing.py`.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from fgpair_jax import contrastive
from fgpair_jax.errors import ConfigError
from fgpair_jax.methods import get_method


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Any  # trainable: {'encoder', 'head', ...method extras}
    batch_stats: Any  # batch-norm running statistics of the online networks
    ema_params: Any  # momentum (key) copy of params[MOMENTUM_SUBTREES]
    ema_batch_stats: Any  # running statistics of the momentum encoder
    opt_state: Any
    queue: jax.Array  # [K, d] negative keys, L2-normalised
    queue_pointer: jax.Array  # int32 scalar: next row of the queue to overwrite
    rng: jax.Array  # uint32[2] raw key data (checkpoint-friendly); split every step
    extras: Any = None  # method state that is not trained (e.g. a variance EMA)


def resolve_queue_size(config, num_train_examples: int) -> int:
    """Queue length K: `moco.queue_size`, or with 0 the largest multiple of the global batch that fits
    in `moco.queue_fraction` of the training set.

    Why a fraction: on a small fine-grained data set a MoCo-ImageNet queue (65,536) would hold every
    image many times over, its own earlier keys among the negatives; sizing it to part of one epoch
    keeps the negatives mostly other images.

    Raises `ConfigError` (naming a size that works, or why none does) when K is not a positive multiple
    of the global batch.
    """
    batch = config.global_batch_size
    size = config.moco.queue_size or int(config.moco.queue_fraction * num_train_examples) // batch * batch
    if size >= batch and size % batch == 0:
        return size
    if config.moco.queue_size:
        what = f"config.moco.queue_size={size} is not a positive multiple of config.global_batch_size={batch}"
    else:
        what = (f"the automatic MoCo queue (config.moco.queue_fraction={config.moco.queue_fraction} of "
                f"{num_train_examples} train images, in whole batches of {batch}) is empty")
    raise ConfigError(f"{what}; {queue_size_advice(batch, num_train_examples)}.")


def largest_safe_queue(batch: int, num_train_examples: int) -> int:
    """The largest multiple of `batch` below N - B (0 if none): a queue that never holds a query's own
    image from an earlier step of the epoch among its negatives (facebookresearch/moco#87)."""
    return max(0, (num_train_examples - batch - 1) // batch * batch)


def queue_size_advice(batch: int, num_train_examples: int) -> str:
    """What to set instead, in words: a safe queue size, or a smaller batch when none exists."""
    safe = largest_safe_queue(batch, num_train_examples)
    if safe >= batch:
        return f"set config.moco.queue_size to a multiple of {batch} below {num_train_examples - batch}, e.g. {safe}"
    return (f"{num_train_examples} train images hold fewer than three batches of {batch}, too few for a MoCo queue "
            f"of whole batches that excludes the query's own images; lower config.global_batch_size")


def create_train_state(config, rng: jax.Array, tx: optax.GradientTransformation, queue_size: int,
                       initial_variables=None) -> TrainState:
    """A fresh state. `initial_variables` (e.g. ImageNet weights) replaces the random init when given."""
    method = get_method(config.method)
    init_rng, queue_rng, state_rng = jax.random.split(rng, 3)
    if initial_variables is None:  # jitted: eager flax init runs op by op, far slower on CPU
        initial_variables = jax.jit(lambda r: method.init_variables(r, config))(init_rng)
    variables = initial_variables
    params, batch_stats = variables["params"], variables["batch_stats"]
    momentum = {name: params[name] for name in method.MOMENTUM_SUBTREES}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        ema_params=jax.tree.map(jnp.copy, momentum),
        ema_batch_stats=jax.tree.map(jnp.copy, {k: v for k, v in batch_stats.items() if k in momentum}),
        opt_state=tx.init(params),
        queue=contrastive.initial_queue(queue_rng, queue_size, config.moco.dim),
        queue_pointer=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(state_rng),
        extras=method.init_extras(config),
    )
