"""A run is built or restored here, and only here: resume first, else a fresh start.

`plan` derives everything a run's shape depends on (steps per epoch, optimiser, the method's own sizes
such as MoCo's queue) and the
restore template: the `TrainState` as `jax.eval_shape` sees it, with its sharding, so nothing is
materialised, no optimiser runs and no weight is read to restore a checkpoint. Pretrained weights
(`config.model.init`) are loaded only when the workdir has no checkpoint (`fresh_state`): a resumed or
re-evaluated run needs nothing but its own workdir.
"""
import dataclasses
import functools
import os
from typing import Optional, Tuple

import jax
import optax

from fgpair_jax import checkpointing, optim, parallel, pretrained
from fgpair_jax import state as state_lib
from fgpair_jax.data import pipeline
from fgpair_jax.errors import MissingFileError
from fgpair_jax.methods import get_method
from fgpair_jax.models import load_pretrained


@dataclasses.dataclass(frozen=True)
class RunPlan:
    steps_per_epoch: int
    total_steps: int
    method_sizes: dict  # what the method's own state is sized by (`Method.state_sizes`; MoCo: queue_size)
    tx: optax.GradientTransformation
    abstract_state: state_lib.TrainState  # jax.ShapeDtypeStruct leaves, replicated over the mesh


def plan(config, num_train_examples: int, mesh) -> RunPlan:
    """The `RunPlan` of `config` on `num_train_examples` images and `mesh` (cheap: shapes only).

    Raises `ConfigError` when the global batch does not divide over the mesh or the method's sizes do
    not fit (e.g. a MoCo queue that is not a multiple of the batch)."""
    parallel.check_batch_divisible(config.global_batch_size, mesh)
    steps_per_epoch = pipeline.steps_per_epoch(num_train_examples, config.global_batch_size)
    tx = optim.make_optimizer(config, steps_per_epoch)
    sizes = state_lib.method_sizes(config, num_train_examples)
    create = functools.partial(state_lib.create_train_state, config, tx=tx, sizes=sizes)
    shapes = jax.eval_shape(create, jax.random.key(config.seed))
    replicated = parallel.replicated(mesh)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)
    return RunPlan(steps_per_epoch, config.num_epochs * steps_per_epoch, sizes, tx, abstract)


def open_checkpoints(config, workdir: str, run_plan: RunPlan) -> checkpointing.Checkpointer:
    """The run's `<workdir>/checkpoints` manager, with the fingerprint its checkpoints must match and, for
    a method whose state had the pre-issue-24 layout, how to restore such a checkpoint (`state.legacy_layout`)."""
    layout = state_lib.legacy_layout(config)
    legacy = None
    if layout is not None:
        template = layout.template(run_plan.abstract_state)
        legacy = checkpointing.LegacyFormat(checkpointing.fingerprint(config, template, checkpointing.LEGACY_FORMAT),
                                            template, layout.convert)
    return checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints,
                                      checkpointing.fingerprint(config, run_plan.abstract_state), legacy=legacy)


def pretrained_variables(config, workdir: str) -> Optional[dict]:
    """The method's fresh variables with the encoder replaced by `config.model.init` weights; None for
    'none'. Converted once (cached under `<workdir>/pretrained`) and checked key by key."""
    if config.model.init == "none":
        return None
    method = get_method(config.method)
    variables = jax.jit(lambda r: method.init_variables(r, config))(jax.random.key(config.seed))
    loaded = load_pretrained(config.model.init, config.model, os.path.join(workdir, "pretrained"))
    encoder = pretrained.merge_pretrained(
        {"params": variables["params"]["encoder"], "batch_stats": variables["batch_stats"]["encoder"]},
        loaded, what=f"config.model.init={config.model.init!r}")
    variables["params"]["encoder"] = encoder["params"]
    variables["batch_stats"]["encoder"] = encoder["batch_stats"]
    return variables


def fresh_state(config, workdir: str, run_plan: RunPlan, mesh) -> state_lib.TrainState:
    """Step 0 of the run, replicated over `mesh`: random init, the encoder from `config.model.init`."""
    state = state_lib.create_train_state(config, jax.random.key(config.seed), run_plan.tx, run_plan.method_sizes,
                                         pretrained_variables(config, workdir))
    return jax.device_put(state, parallel.replicated(mesh))


def restore_or_start(config, workdir: str, run_plan: RunPlan, mesh,
                     checkpointer: checkpointing.Checkpointer) -> Tuple[state_lib.TrainState, Optional[dict]]:
    """(state, data iterator state) of the newest checkpoint that restores, or (`fresh_state`, None) when
    there is none. Newer step folders that do not restore (damaged, incomplete, orbax's temporary folder of
    a killed save) are skipped in one line each and set aside (`Checkpointer.restore`).

    Raises `ConfigError` (one line, nothing on disk touched) when the checkpoint was written by another
    config: another model or method, other shapes, or another value of a key that defines training
    (`run_config.training_fingerprint`: epochs, batch, learning rate, ...); `CheckpointReadError` when
    no checkpoint restores."""
    if checkpointer.latest_step() is None:
        return fresh_state(config, workdir, run_plan, mesh), None
    state = checkpointer.restore(run_plan.abstract_state)  # walks back past damaged steps
    return state, checkpointer.restore_data_state()  # of the step `restore` used


def restore_latest(config, workdir: str, num_train_examples: int, mesh) -> state_lib.TrainState:
    """The newest checkpointed state of a run that restores (for re-evaluation); `MissingFileError` if there is
    none. It moves no file: newer step folders that do not restore are skipped in one line each, and a step
    deleted while it is read (a run still training there, with its `keep_checkpoints`) is said in one line and
    replaced by the newest step then (`Checkpointer.restore`)."""
    run_plan = plan(config, num_train_examples, mesh)
    checkpointer = open_checkpoints(config, workdir, run_plan)
    try:
        if checkpointer.latest_step() is None:
            raise MissingFileError(f"No checkpoint in {checkpointer.directory}: train first with "
                                   "`python -m fgpair_jax.main`.")
        return checkpointer.restore(run_plan.abstract_state, set_aside=False)  # evaluation moves no file
    finally:
        checkpointer.close()
