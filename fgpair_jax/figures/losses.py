"""loss_curves.png: each logged loss term and the pair weight against the step, with the total's
formula and the schedule phases of the run's config."""
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


def schedule_phases(config, steps_per_epoch):
    """(last logged step of fgpair's warm-up, logged step where its ramp reaches full weight) as floats, from
    `config.fgpair`'s `warmup_epochs` and `ramp_epochs` and `steps_per_epoch`, in the log's numbering: the
    step logged as s runs with the weight of epoch (s - 1) / steps_per_epoch (`step.train_step` reads the
    state's step before its update). None for a run without that schedule (another method, nu = 0, or an
    unknown steps_per_epoch). The two are equal when ramp_epochs = 0."""
    if config is None or not steps_per_epoch or config.method != "fgpair" or config.fgpair.nu <= 0:
        return None
    warmup = config.fgpair.warmup_epochs * steps_per_epoch
    return float(warmup + 1), float(warmup + config.fgpair.ramp_epochs * steps_per_epoch + 1)


def loss_formula(config) -> str:
    """What the logged total is, with the config's weights, e.g. 'L = L_C + α·L_R + ν_t·L_Cp with α = 1.0,
    ν_t = 0 until epoch 1, then linear to ν = 1.0 at epoch 1.5'; '' without a config."""
    if config is None:
        return ""
    if config.method == "fgpair":
        c = config.fgpair
        if c.ramp_epochs > 0:
            schedule = f"ν_t = 0 until epoch {c.warmup_epochs:g}, then linear to ν = {c.nu:g} at epoch " \
                       f"{c.warmup_epochs + c.ramp_epochs:g}"
        else:
            schedule = f"ν_t = 0 until epoch {c.warmup_epochs:g}, then ν = {c.nu:g}"
        return f"L = L_C + α·L_R + ν_t·L_Cp with α = {c.alpha:g}, {schedule} (L_C: {c.base}'s loss)"
    if config.method == "lcr":
        return f"L = L_C + ν·KL with ν = {config.lcr.nu:g} (L_C: MoCo's InfoNCE)"
    return f"L = L_C, the {config.method} loss"


def _pair_weight_curve(config, steps_per_epoch: int, last_step: int):
    """(logged steps 1..last_step, ν_t each ran with): `fgpair.pair_weight` itself, in the log's numbering."""
    from fgpair_jax.methods import fgpair

    steps = np.arange(1, last_step + 1)
    return steps, np.asarray(fgpair.pair_weight(config, (steps - 1).astype(np.float32) / steps_per_epoch))


def save_loss_curves(metrics_jsonl: str, path: str, config=None, steps_per_epoch=None) -> bool:
    """Each loss term and the pair weight against the step, from the run's metrics.jsonl (the logged
    points, every `log_every_steps`, marked), titled with what the total is (`loss_formula`), with
    fgpair's warm-up (shaded) and ramp (hatched) computed from `config` and `steps_per_epoch`
    (`schedule_phases`), and an epoch axis on top when `steps_per_epoch` is known. Without a config the
    curves alone. False (nothing written) when no step was logged, e.g. a run of zero epochs."""
    records = read_jsonl(metrics_jsonl)
    names = [n for n in LOSS_CURVES if any(n in r for r in records)]
    if not names:
        return False
    phases = schedule_phases(config, steps_per_epoch)
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
        if name == "pair_weight" and phases:
            ax.plot(*_pair_weight_curve(config, steps_per_epoch, max(s for s, _ in points)), color="k",
                    linewidth=0.8, linestyle="--", label="config's schedule")
            ax.legend(fontsize=6, loc="lower right")
        if steps_per_epoch:
            top = ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch))
            top.set_xlabel("epoch", fontsize=7)
            top.tick_params(labelsize=6)
    if phases:
        axes.ravel()[0].legend(fontsize=6, loc="best")
    formula = loss_formula(config)
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
