"""loss_curves.png: each logged loss term and the pair weight against the step, with the total's
formula and the schedule phases the method gives for the run's config (`Method.loss_schedule`)."""
import numpy as np
from matplotlib.figure import Figure

from fgpair_jax.figures.images import save, text_inches, wrapped
from fgpair_jax.metrics_writer import read_jsonl

# Logged name -> (panel title, y-label), in panel order: the total, each term, and the weight that
# switches a term on.
PANELS = {
    "loss": ("total loss L", "L"),
    "loss_contrastive": ("L_C: InfoNCE of the two views", "L_C"),
    "loss_ssl": ("L_C: SSL loss of the two views", "L_C"),
    "output_std": ("output std (collapse monitor)", "std of l2-normalised z"),
    "loss_reconstruction": ("L_R: decoder reconstruction", "mean squared error"),
    "loss_pair": ("L_Cp: SSL loss of the pairs", "L_Cp (unweighted)"),
    "loss_attention_kl": ("LCR's attention KL", "KL (unweighted)"),
    "pair_weight": ("ν_t: the weight of L_Cp", "ν_t"),
}
LOSS_CURVES = tuple(PANELS)
COLUMNS = 4  # panels in one row; more panels go into two rows


def schedule_phases(schedule, steps_per_epoch):
    """(last logged step of the warm-up, logged step where the ramp reaches full weight) as floats, from
    the method's `schedule` (`methods.Method.loss_schedule`: its 'phases' in epochs) and `steps_per_epoch`,
    in the log's numbering: the step logged as s runs with the weight of epoch (s - 1) / steps_per_epoch
    (`step.train_step` reads the state's step before its update). None for a schedule without phases or
    an unknown steps_per_epoch. The two are equal without a ramp."""
    if not schedule or not schedule.get("phases") or not steps_per_epoch:
        return None
    warmup_end, ramp_end = schedule["phases"]
    return float(warmup_end * steps_per_epoch + 1), float(ramp_end * steps_per_epoch + 1)


def _weight_curve(schedule, steps_per_epoch: int, last_step: int):
    """(logged steps 1..last_step, the weight each ran with): the schedule's own 'weight', in the log's
    numbering."""
    steps = np.arange(1, last_step + 1)
    return steps, schedule["weight"]((steps - 1).astype(np.float32) / steps_per_epoch)


def save_loss_curves(metrics_jsonl: str, path: str, schedule=None, steps_per_epoch=None) -> bool:
    """Each loss term and the pair weight against the step, from the run's metrics.jsonl (the logged
    points, every `log_every_steps`, marked), titled with what the total is (`schedule`: the method's
    `loss_schedule(config)`, its 'formula'), with the warm-up (shaded) and ramp (hatched) of its 'phases'
    (`schedule_phases`) and its 'weight' dashed beside the logged ν_t, and an epoch axis on top when
    `steps_per_epoch` is known. Without a schedule the curves alone. False (nothing written) when no step
    was logged, e.g. a run of zero epochs."""
    records = read_jsonl(metrics_jsonl)
    names = [n for n in LOSS_CURVES if any(n in r for r in records)]
    if not names:
        return False
    phases = schedule_phases(schedule, steps_per_epoch)
    columns = len(names) if len(names) <= COLUMNS else -(-len(names) // 2)  # at most two rows
    rows = -(-len(names) // columns)
    fig = Figure(figsize=(3.6 * columns, 2.8 * rows + 1.0))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.ravel(), names):
        points = [(r["step"], r[name]) for r in records if name in r]
        ax.plot(*zip(*points), marker=".", markersize=3, linewidth=1, label="logged")
        title, ylabel = PANELS[name]
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if phases:
            ax.axvspan(0, phases[0], color="0.88", label="warm-up: ν_t = 0")
            if phases[1] > phases[0]:
                ax.axvspan(phases[0], phases[1], facecolor="none", hatch="//", edgecolor="0.7", label="ramp")
        if name == "pair_weight" and phases and schedule.get("weight"):
            ax.plot(*_weight_curve(schedule, steps_per_epoch, max(s for s, _ in points)), color="k",
                    linewidth=0.8, linestyle="--", label="config's schedule")
            ax.legend(fontsize=6, loc="lower right")
        if steps_per_epoch:
            top = ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch))
            top.set_xlabel("epoch", fontsize=7)
            top.tick_params(labelsize=6)
    if phases:
        axes.ravel()[0].legend(fontsize=6, loc="best")
    formula = (schedule or {}).get("formula", "")
    title = wrapped("Training losses" + (f": {formula}" if formula else ""), 26 * columns)
    fig.suptitle(title, fontsize=10, y=1 - 0.05 / fig.get_figheight(), va="top")
    note = "Points: the logged steps (one step's values, not epoch means)."
    if phases:
        note += (" Shading from the config's schedule: grey = warm-up (L_Cp off, the decoder learns to render), "
                 "hatched = ν_t ramps up. The total rises when L_Cp switches on: it adds ν_t·L_Cp, "
                 "which is not a worse fit.")
    note = wrapped(note, 30 * columns)
    fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=7, color="0.25")
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, (text_inches(note, 7) + 0.05) / height, 1, 1))  # it makes room for the suptitle
    save(fig, path)
    return True
