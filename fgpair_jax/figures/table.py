"""plot.png of the comparison table: each arm's mean linear top-1 and retrieval rank-1 over seeds, with a
95% CI bar only where there are seeds to compute one, and the `init` reference marked."""
import math

import numpy as np
from matplotlib.patches import Patch
from matplotlib.figure import Figure

from fgpair_jax.figures.images import save, wrapped

METRICS = (("linear_top1", "linear probe top-1 (%)"), ("retrieval_rank1", "retrieval rank-1 (%)"))
COLOURS = {"baseline": "#777777", "method": "#3a7", "reference": "#dddddd"}


def error_bar(half_width):
    """The error bar's half-width, or None when there is no interval to draw (one seed: the half-width
    `experiments.mean_and_interval` gives is NaN; or the metric is missing)."""
    if half_width is None or not math.isfinite(half_width):
        return None
    return float(half_width)


def bar_label(mean, half_width, seeds: int) -> str:
    """The text above a bar: '76.83 ± 1.32', '68.52 (n=1, no CI)' or 'n/a'."""
    if mean is None or not math.isfinite(mean):
        return "n/a"
    bar = error_bar(half_width)
    if bar is not None:
        return f"{mean:.2f}\n± {bar:.2f}"
    return f"{mean:.2f}\n(n={seeds}, no CI)"


def table_figure(summary: dict, baseline: str, data: str = "", reference: str = "init") -> Figure:
    """The bar chart of `summary` (`experiments.summarize`: arm -> {'seeds', 'metrics': {metric: (mean,
    95% CI half-width)}}), y from 0 to 100 (percent), each bar labelled with its value (`bar_label`), n seeds under
    each arm, CI bars only where `error_bar` gives one; `reference` (not a method) hatched, with a dashed
    line at its value; `baseline` in grey."""
    arms = list(summary)
    fig = Figure(figsize=(max(10.0, 1.9 * len(arms)), 4.8))
    axes = fig.subplots(1, 2)
    positions = np.arange(len(arms))
    kind = {arm: "baseline" if arm == baseline else "reference" if arm == reference else "method" for arm in arms}
    for axis, (metric, title) in zip(axes, METRICS):
        cells = [summary[a]["metrics"].get(metric, (float("nan"), float("nan"))) for a in arms]
        means = [m if m is not None and math.isfinite(m) else 0.0 for m, _ in cells]
        bars = axis.bar(positions, means, color=[COLOURS[kind[a]] for a in arms], edgecolor="0.3", linewidth=0.6)
        for bar, arm in zip(bars, arms):
            if kind[arm] == "reference":
                bar.set_hatch("//")
        with_ci = [(i, means[i], error_bar(half)) for i, (_, half) in enumerate(cells) if error_bar(half) is not None]
        if with_ci:
            where, values, halves = zip(*with_ci)
            axis.errorbar(where, values, yerr=halves, fmt="none", ecolor="k", capsize=4, linewidth=1.2)
        for i, (arm, (mean, half)) in enumerate(zip(arms, cells)):
            text = bar_label(mean, half, len(summary[arm]["seeds"]))
            below = means[i] - (error_bar(half) or 0.0) - 2.0  # inside the bar, under its error bar
            if below > 15:
                on_hatch = kind[arm] == "reference"
                axis.text(i, below, text, ha="center", va="top", fontsize=7, color="k" if on_hatch else "w",
                          fontweight="bold", bbox={"facecolor": "w", "edgecolor": "none", "pad": 1} if on_hatch else None)
            else:
                axis.text(i, means[i] + (error_bar(half) or 0.0) + 1.5, text, ha="center", va="bottom", fontsize=7)
        if reference in arms:
            value = cells[arms.index(reference)][0]
            if value is not None and math.isfinite(value):
                axis.axhline(value, color="0.4", linestyle="--", linewidth=0.8)
        axis.set_xticks(positions, [f"{a}\nn={len(summary[a]['seeds'])}" for a in arms], fontsize=8)
        axis.set_ylim(0, 100)
        axis.set_ylabel("percent (axis from 0)", fontsize=8)
        axis.set_title(title, fontsize=10)
    legend = [Patch(facecolor=COLOURS["baseline"], label=f"{baseline} (the baseline)")] if baseline in arms else []
    legend.append(Patch(facecolor=COLOURS["method"], label="methods and ablations"))
    if reference in arms:
        legend.append(Patch(facecolor=COLOURS["reference"], hatch="//", label=f"{reference}: the start encoder, "
                            "no SSL step (reference; dashed line)"))
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    heading = ("mean over seeds (n under each arm); error bars: two-sided 95% Student-t CI over seeds, "
               "none where n = 1")
    fig.suptitle(wrapped(f"{data}: {heading}" if data else heading[0].upper() + heading[1:], 120), fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # it makes room for the suptitle
    return fig


def save_table_plot(summary: dict, path: str, baseline: str, data: str = "", reference: str = "init") -> None:
    """`table_figure` written to `path` (PNG)."""
    save(table_figure(summary, baseline, data, reference), path, dpi=110)
