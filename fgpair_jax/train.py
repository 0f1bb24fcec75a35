"""`train_and_evaluate(config, workdir)`: resume-first training, then evaluation of the frozen encoder.

The loop: restore the latest checkpoint if the workdir has one (after checking it belongs to this
config), otherwise start fresh; then for each step feed the host batch onto the mesh, run the jitted
step, log, and checkpoint (every `checkpoint_every_steps`, every epoch end, on preemption, at the end).
Evaluation writes `<workdir>/eval/metrics.json` and `features.npz` (see `evaluate.py`).
"""
import os
import time

import jax
import numpy as np
from absl import logging

from fgpair_jax import (checkpointing, compilation_cache, distributed, evaluate, features, methods, numerics,
                        parallel, preemption, preflight, run, run_config, viz)
from fgpair_jax import step as step_lib
from fgpair_jax.data import nuisance, pipeline, sources as data_sources
from fgpair_jax.metrics_writer import MetricsWriter, Progress, announce


def _warn_if_sized_for_an_accelerator(config) -> None:
    """The paper protocol (ResNet-50 at 224 px, batch 128) needs far more memory than a CPU host has to
    spare (results/README.md); say so before the first step instead of after an out-of-memory kill."""
    pixels = config.global_batch_size * config.data.image_size ** 2
    if jax.default_backend() == "cpu" and config.data.image_size >= 224 and pixels >= 64 * 224 ** 2:
        announce(f"Warning: global batch {config.global_batch_size} at {config.data.image_size} px is sized "
                 "for a GPU/TPU; on this CPU it may run out of memory. For a CPU use configs/cub.py:quick.")


def _host_batches(config, source, start_step: int = 0):
    """This process's share of the global batches from global batch `start_step` on. A batch depends on
    the step alone (`pipeline.py`), so a resumed run starts at its restored step: the same next batches
    whatever the worker or process count it ran with before."""
    dataset = pipeline.train_dataset(
        source,
        global_batch_size=config.global_batch_size,
        image_size=config.data.image_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        worker_count=config.data.worker_count,
        crop_scale=(config.data.crop_scale_min, 1.0),
        start_step=start_step,
        nuisance=nuisance.Nuisance.of_config(config),
        resize_with=config.data.view_resize,
    )
    return pipeline.ClosingIterator(dataset)


def _mean_metrics(history: list) -> dict:
    """Mean of each scalar metric over a list of per-step metric dicts (one device transfer). A
    logged-steps-only diagnostic (`step.GRADIENT_SHARE_PREFIX`, NaN on the other steps) is averaged over the
    steps that measured it, and left out when none did; any other NaN (a non-finite loss) stays visible."""
    stacked = jax.device_get(jax.tree.map(lambda *xs: jax.numpy.stack(xs), *history))
    means = {}
    for name, values in stacked.items():
        if name.startswith(step_lib.GRADIENT_SHARE_PREFIX):
            values = values[~np.isnan(values)]
            if not values.size:
                continue
        means[name] = float(np.mean(values))
    return means


def _epoch_summary(epoch, num_epochs, step, means, rate, elapsed, knn=None) -> str:
    """One line per epoch; `rate` None (no step timed in it besides the one that compiled) is left out."""
    parts = [f"epoch {epoch}/{num_epochs}", f"step {step}"]
    parts += [f"{name} {value:.4f}" for name, value in sorted(means.items())]
    if knn is not None:
        parts.append(f"knn_top1 {knn:.2f}%")
    if rate is not None:
        parts.append(f"{rate:.1f} img/s")
    parts.append(f"{elapsed / 60:.1f} min")
    return " | ".join(parts)


def _already_evaluated(config, workdir, run_plan, checkpointer):
    """The saved metrics when the run is finished and evaluated: its newest checkpoint is the last step, of
    this training config (`CheckpointMismatchError` otherwise, as a resume would say), and eval/metrics.json
    scores that step under this evaluation config (`evaluate.current_metrics`); else None."""
    latest = checkpointer.latest_step()
    if latest is None or latest != run_plan.total_steps:
        return None
    checkpointer.check_compatible(latest)
    return evaluate.current_metrics(workdir, latest, config)


def train_and_evaluate(config, workdir: str) -> dict:
    """Train `config` in `workdir` (resuming if it holds a checkpoint), then evaluate; returns the metrics.

    The config is validated before anything is built (`run_config.validate`); a checkpoint written
    under another training config is refused in one line. Returns {} without evaluating when the run
    was asked to stop (SIGTERM, preemption) after saving.
    """
    run_config.validate(config)  # makes no JAX call: the job is joined first
    compilation_cache.enable(config.compilation_cache_dir)  # before the first compile: resumes and seeds reuse it
    distributed.maybe_initialize()
    config = run_config.resolved(config)
    workdir = run_config.user_path(workdir)
    checkpointing.check_directory(os.path.join(workdir, "checkpoints"))  # before minutes of data building
    init_summary = None if run.has_checkpoint(workdir) else run.check_init_checkpoint(config)  # names, shapes
    announce(f"JAX {jax.__version__} on {jax.device_count()} {jax.default_backend()} device(s), "
             f"process {jax.process_index()} of {jax.process_count()}; workdir {workdir}")
    if init_summary:
        announce(f"Init: {init_summary}")
    mesh = parallel.make_mesh()
    parallel.check_batch_divisible(config.global_batch_size, mesh)
    _warn_if_sized_for_an_accelerator(config)
    features.announce_eval_batch_size(config)
    sources, info = data_sources.load_sources(config, workdir)
    announce(data_sources.build_line(info))
    preflight.check(config, sources)  # what the data decides, before any state or step
    run_plan = run.plan(config, info.split_sizes["train"], mesh)
    checkpointer = run.open_checkpoints(config, workdir, run_plan)
    try:
        saved = _already_evaluated(config, workdir, run_plan, checkpointer)
        if saved is not None:
            checkpointer.close()
            announce(f"Finished and evaluated at step {saved['step']}: {evaluate.summary_line(saved)} "
                     f"({evaluate.metrics_path(workdir)}). To re-evaluate: python -m fgpair_jax.evaluate "
                     f"--workdir={workdir} --force (or change a --config.eval. knob).")
            return saved
        if checkpointer.latest_step() is None:
            announce("Initialising the model (its initialiser compiles first) ...")
        state, data_state = run.restore_or_start(config, workdir, run_plan, mesh, checkpointer)
    except BaseException:
        checkpointer.close()
        raise
    if data_state is not None:
        announce(f"Resumed from step {int(state.step)} in {checkpointer.directory}.")
    run_config.save(config, workdir)

    start_step = int(jax.device_get(state.step))
    writer = MetricsWriter(workdir, resume_step=start_step)
    batches = _host_batches(config, sources["train"], start_step)
    try:
        try:
            with preemption.StopRequests() as stop_requests:
                state, stopped = _train_loop(config, state, batches, run_plan, mesh, sources, info, checkpointer,
                                             writer, stop_requests)
        finally:
            checkpointer.close()  # waits for pending saves: never leave a half-written latest checkpoint
            batches.close()  # grain's workers stop now, not at the interpreter's exit (`pipeline.ClosingIterator`)
        if stopped:
            return {}
        metrics = evaluate.evaluate_state(config, workdir, state, sources, info, mesh)
        writer.write_scalars(int(state.step), {f"eval/{k}": v for k, v in evaluate.scalar_metrics(metrics).items()
                                               if k != "step"})
    finally:
        writer.close()
    if config.eval.figures:
        announce(f"Drawing figures into {os.path.join(workdir, 'figures')} ...")
        figures = _figures_without_losing_the_metrics(config, workdir, state, sources)
        if figures:
            announce(f"Figures: {', '.join(figures)}")
    return metrics


def _figures_without_losing_the_metrics(config, workdir, state, sources) -> list:
    """`viz.write_figures`, run after the metrics are written: figures are diagnostics, so a failure there
    is a one-line warning (its traceback in the log) and the run still ends with its metrics returned."""
    try:
        return viz.write_figures(config, workdir, state, sources["test"])
    except Exception as error:  # noqa: BLE001 -- anything; the metrics on disk must not be lost to it
        logging.info("Writing the figures failed", exc_info=True)
        announce(f"Warning: the figures failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                 "eval/metrics.json is written. The traceback is logged at --verbosity=0.")
        return []


def _train_loop(config, state, batches, run_plan, mesh, sources, info, checkpointer, writer, stop_requests):
    """Steps from `state.step` to the end; returns (final state, whether a stop request ended it early).

    Checkpoints every `checkpoint_every_steps`, at every epoch end, at the end and when asked to stop;
    a step's non-finite flag is checked before anything after it is saved (`numerics.py`).
    """
    steps_per_epoch, total_steps = run_plan.steps_per_epoch, run_plan.total_steps
    start_step = int(jax.device_get(state.step))
    train_step = step_lib.make_train_step(config, run_plan.tx, mesh, steps_per_epoch)
    progress = None  # the bar starts after the first step, which compiles: its rate and ETA leave that out
    feature_fn = features.make_feature_fn(config, mesh)
    latest = checkpointer.latest_step()
    nonfinite = numerics.NonfiniteMonitor(config.on_nonfinite, "no checkpoint yet" if latest is None else
                                          f"latest checkpoint: step {latest} in {checkpointer.directory}")
    arm, overrides = methods.arm_of(config)
    named = "" if arm == config.method else f" ({arm}: {', '.join(f'{k}={v}' for k, v in overrides.items())})"
    announce(f"Training {config.method}{named} / {config.model.name} at {config.data.image_size} px: "
             f"{info.split_sizes['train']} train images, {steps_per_epoch} steps/epoch, {total_steps} steps, "
             f"global batch {config.global_batch_size} on {mesh.devices.size} device(s)"
             + "".join(f", {name} {size}" for name, size in run_plan.method_sizes.items()) + ".")

    def save(step, force=False):
        nonfinite.flush()
        checkpointer.save(step, state, pipeline.train_position(step), force=force)
        nonfinite.checkpoint_hint = f"latest checkpoint: step {step} in {checkpointer.directory}"

    start_time, epoch_metrics = time.perf_counter(), []
    epoch_start_time, epoch_start_step = start_time, start_step
    if start_step < total_steps:
        announce("Compiling the training step (and reading the first batch) ...")
    for step in range(start_step + 1, total_steps + 1):
        state, metrics = train_step(state, parallel.global_batch(next(batches), mesh))
        if progress is None:
            jax.block_until_ready(metrics)
            announce(f"Compiled: step {step} took {time.perf_counter() - start_time:.0f} s, the compile included.")
            progress = Progress(total_steps, step, config.global_batch_size)
            epoch_start_time, epoch_start_step = time.perf_counter(), step
        nonfinite.observe(step, metrics)
        epoch_metrics.append(metrics)
        if step_lib.is_logged_step(step, config.log_every_steps, total_steps):
            scalars = jax.device_get(metrics)
            rate = progress.update(step, float(scalars["loss"]))
            writer.write_scalars(step, scalars if rate is None else dict(scalars, images_per_second=rate))
        if step % config.checkpoint_every_steps == 0 or step % steps_per_epoch == 0:
            save(step)  # before the epoch's kNN monitor: a failure there must not lose the epoch
        if step % steps_per_epoch == 0:
            epoch, now = step // steps_per_epoch, time.perf_counter()
            rate = None
            if step > epoch_start_step:
                rate = (step - epoch_start_step) * config.global_batch_size / max(now - epoch_start_time, 1e-9)
            means = _mean_metrics(epoch_metrics)
            knn = None
            if config.eval.knn_every_epochs and epoch % config.eval.knn_every_epochs == 0:
                knn = features.knn_monitor(feature_fn, state, sources, config, mesh, info.num_classes)
                writer.write_scalars(step, {"knn_top1": knn})
            progress.write(_epoch_summary(epoch, config.num_epochs, step, means, rate, now - start_time, knn))
            epoch_metrics, epoch_start_time, epoch_start_step = [], time.perf_counter(), step
        reason = stop_requests.reason(checkpointer, step)
        if reason:
            save(step, force=True)
            progress.close()
            announce(f"Stopped by {reason} at step {step}: checkpoint saved; rerun the same command to resume.")
            return state, True
    nonfinite.flush()
    if progress is not None:
        progress.close()
    if nonfinite.skipped_steps:
        announce(f"Skipped {len(nonfinite.skipped_steps)} non-finite step(s): {nonfinite.skipped_steps[:20]}.")
    save(total_steps, force=True)
    return state, False
