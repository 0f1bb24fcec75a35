"""The training state: one pytree holding everything the next step depends on.

What every method shares (`step`, `params`, `batch_stats`, `opt_state`, `rng`) is a field here; what is a
method's own (MoCo's queue and momentum encoder, BYOL's target network, fgpair's variance EMA) lives in
`method_state`, a dict the method creates (`Method.init_state`) and updates (`Method.update_state`).
A method without a queue carries none: SimSiam's `method_state` is empty.

Saving this pytree (plus the data iterator position, which is a function of `step`) is enough to
resume a run exactly: see `checkpointing.py`. Checkpoints of the earlier layout (`LegacyTrainState`:
queue, momentum encoder and extras as fields of every state, checkpoint format 2) restore through
`legacy_layout`.
"""
from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from fgpair_jax.methods import get_method


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Any  # trainable: {'encoder', ...method heads}
    batch_stats: Any  # batch-norm running statistics of the online networks
    opt_state: Any
    rng: jax.Array  # uint32[2] raw key data (checkpoint-friendly); split every step
    method_state: Any  # the method's own state, not trained by the optimiser ({} if none)


@flax.struct.dataclass
class LegacyTrainState:
    """The train state of checkpoint format 2 (before issue 24): every method carried MoCo's fields."""
    step: jax.Array
    params: Any
    batch_stats: Any
    ema_params: Any
    ema_batch_stats: Any
    opt_state: Any
    queue: jax.Array
    queue_pointer: jax.Array
    rng: jax.Array
    extras: Any = None


def method_sizes(config, num_train_examples: Optional[int]) -> dict:
    """The shapes `config`'s method state depends on besides the config (e.g. MoCo's queue length, which
    depends on the train split's size): `Method.state_sizes`. Raises its `ConfigError`."""
    return dict(get_method(config.method).state_sizes(config, num_train_examples))


def create_train_state(config, rng: jax.Array, tx: optax.GradientTransformation, sizes: Mapping[str, int],
                       initial_variables=None) -> TrainState:
    """A fresh state; `sizes` from `method_sizes`. `initial_variables` (e.g. ImageNet weights) replaces the
    random init when given.

    Built by one jitted program: op by op, the optimizer's and the method's init ran as many tiny
    programs, each compiled on its own and each too quick to enter the persistent compilation cache
    (results/README.md, `compile_cache.json`). The imported weights are an argument, not constants of the
    program."""
    method = get_method(config.method)
    sizes = dict(sizes)

    def build(rng, initial_variables):
        init_rng, method_rng, state_rng = jax.random.split(rng, 3)
        if initial_variables is None:
            initial_variables = method.init_variables(init_rng, config)
        params, batch_stats = initial_variables["params"], initial_variables["batch_stats"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
            rng=jax.random.key_data(state_rng),
            method_state=method.init_state(method_rng, initial_variables, config, sizes),
        )

    return jax.jit(build)(rng, initial_variables)


class LegacyLayout:
    """How a format-2 checkpoint of `config`'s method maps onto today's `TrainState`.

    `template(abstract_state)` is the `LegacyTrainState` the old checkpoint restores into (same shapes,
    dtypes and shardings), `convert(legacy)` the `TrainState` it stands for. Methods that existed before the
    layout changed (moco, lcr, fgpair on MoCo) define `to_legacy_fields` / `from_legacy_fields`."""

    def __init__(self, method):
        self.method = method

    def template(self, state: TrainState) -> LegacyTrainState:
        fields = self.method.to_legacy_fields(state.method_state)
        return LegacyTrainState(step=state.step, params=state.params, batch_stats=state.batch_stats,
                                opt_state=state.opt_state, rng=state.rng, **fields)

    def convert(self, legacy: LegacyTrainState) -> TrainState:
        fields = {name: getattr(legacy, name) for name in LEGACY_METHOD_FIELDS}
        return TrainState(step=legacy.step, params=legacy.params, batch_stats=legacy.batch_stats,
                          opt_state=legacy.opt_state, rng=legacy.rng,
                          method_state=self.method.from_legacy_fields(fields))


LEGACY_METHOD_FIELDS = ("ema_params", "ema_batch_stats", "queue", "queue_pointer", "extras")


def legacy_layout(config) -> Optional[LegacyLayout]:
    """The `LegacyLayout` of `config`'s method, or None when its state never had the old layout (a method
    added since, e.g. simsiam, or fgpair on a negative-free base): such a checkpoint cannot exist."""
    method = get_method(config.method)
    if getattr(method, "has_legacy_layout", lambda config: False)(config):
        return LegacyLayout(method)
    return None
