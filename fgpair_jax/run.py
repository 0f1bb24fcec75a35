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
from fgpair_jax.methods import checkpoint_branches, get_method
from fgpair_jax.models import IMAGENET, import_init


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


def _import_init(config, cache_dir: Optional[str], with_data: bool):
    return import_init(config.model.init, config.model, cache_dir, method=config.method,
                       method_branches=checkpoint_branches(), with_data=with_data)


def _subtree(variables, name: str) -> dict:
    return {c: variables[c][name] for c in ("params", "batch_stats") if name in variables.get(c, {})}


def _merge_imported(variables, imported, config) -> dict:
    """`variables` (the method's, fresh or abstract) with the encoder and the method's imported branches
    replaced; every key and shape checked (`pretrained.CheckpointError`, one line)."""
    what = f"config.model.init={config.model.init!r}"
    replaced = {"encoder": pretrained.merge_pretrained(_subtree(variables, "encoder"), imported["encoder"], what)}
    for subtree, loaded in imported["branches"].get(config.method, {}).items():
        modules = "/".join(get_method(config.method).CHECKPOINT_BRANCHES[subtree])
        replaced[subtree] = pretrained.merge_pretrained(_subtree(variables, subtree), loaded,
                                                        f"{what} ({config.method}'s {modules} -> {subtree})")
    for name, tree in replaced.items():
        for collection in ("params", "batch_stats"):
            if collection in tree:
                variables[collection][name] = tree[collection]
    return variables


def has_checkpoint(workdir: str) -> bool:
    """Whether `<workdir>/checkpoints` holds any step folder (a resumed run reads no `model.init`)."""
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and bool(checkpointing.step_folders(os.listdir(directory)))


def check_init_checkpoint(config) -> Optional[str]:
    """Read `config.model.init`'s names and shapes only and check that they fit the run: the encoder (any
    wrapper, `checkpoint_import.py`), and the method's branches (LCR's conv16/bn16 against
    `lcr.attention_channels`). None for "none" and "imagenet" (checked by `models.check_init`); else the
    one-line summary of what will be used and dropped. For a run of 0 epochs (evaluating a checkpoint as
    it is) a method's branches must be in the file: an untrained branch would decide its features.
    Raises `MissingFileError` or `pretrained.CheckpointError` (one line), before any data is built."""
    if config.model.init in ("none", IMAGENET):
        return None
    imported, summary = _import_init(config, None, with_data=False)
    method = get_method(config.method)
    missing = [subtree for subtree in method.CHECKPOINT_BRANCHES if subtree not in imported["branches"].get(config.method, {})]
    if missing and config.num_epochs == 0:
        modules = "/".join(m for s in missing for m in method.CHECKPOINT_BRANCHES[s])
        raise pretrained.CheckpointError(
            f"config.model.init={config.model.init!r} has no {modules} beside its encoder, so {config.method}'s "
            f"{'/'.join(missing)} would be untrained at 0 epochs; evaluate it with --config.method=moco (pooled features).")
    abstract = jax.eval_shape(lambda r: method.init_variables(r, config), jax.random.key(0))
    what = f"config.model.init={config.model.init!r}"
    pretrained.check_layout(_subtree(abstract, "encoder"), pretrained.without_classifier(imported["encoder"]), what)
    for subtree, loaded in imported["branches"].get(config.method, {}).items():
        modules = "/".join(method.CHECKPOINT_BRANCHES[subtree])
        try:
            pretrained.check_layout(_subtree(abstract, subtree), loaded, f"{what} ({config.method}'s {modules} -> {subtree})")
        except pretrained.CheckpointError as error:
            reason = str(error).split(": it is not a checkpoint")[0]
            raise pretrained.CheckpointError(f"{reason}: set config.{config.method}'s widths to the checkpoint's "
                                             f"(or use --config.method=moco to leave {modules} out).") from None
    return summary


def pretrained_variables(config, workdir: str) -> Optional[dict]:
    """The method's fresh variables with the encoder (and the method's branches a checkpoint holds, e.g.
    LCR's attention) replaced by `config.model.init` weights; None for 'none'. Converted once (cached
    under `<workdir>/pretrained`) and checked key by key."""
    if config.model.init == "none":
        return None
    method = get_method(config.method)
    variables = jax.jit(lambda r: method.init_variables(r, config))(jax.random.key(config.seed))
    imported, _ = _import_init(config, os.path.join(workdir, "pretrained"), with_data=True)
    return _merge_imported(variables, imported, config)


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
