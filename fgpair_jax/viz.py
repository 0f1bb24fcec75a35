"""Figures in `<workdir>/figures/`: Grad-CAM overlays, synthesized-pair triplets, loss curves.

They are how a person checks the method is doing what it claims: Grad-CAM should sit on the bird, and
the two images of a synthesized pair should differ only in details the encoder is asked to ignore.
What a method shows is its own (`Method.figure_arrays`); this module only draws. It uses matplotlib's
object-oriented `Figure` (no pyplot, no backend switch), so importing it changes no global state.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from fgpair_jax.data import augment, nuisance, pipeline
from fgpair_jax.methods import get_method
from fgpair_jax.metrics_writer import read_jsonl
from fgpair_jax.models import input_normalization

# Panels of the loss figure, in order: the total, each term, and the weight that switches a term on.
LOSS_CURVES = ("loss", "loss_contrastive", "loss_ssl", "output_std", "loss_reconstruction", "loss_pair", "loss_attention_kl", "pair_weight")


def to_uint8_image(normalized: np.ndarray, model_config) -> np.ndarray:
    """Encoder-space (normalised) float images -> displayable uint8 RGB."""
    mean, std = (np.asarray(v) for v in input_normalization(model_config))
    return (np.clip(normalized * std + mean, 0.0, 1.0) * 255).round().astype(np.uint8)


def _hidden_axes(rows: int, columns: int, width: float, height: float):
    fig = Figure(figsize=(width * columns, height * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    return fig, axes


def save_gradcam_overlays(images: np.ndarray, cams: np.ndarray, path: str, columns: int = 8) -> None:
    """Each image above itself overlaid with its Grad-CAM map ([B, S, S] in [0, 1])."""
    fig, axes = _hidden_axes(2 * int(np.ceil(len(images) / columns)), columns, 1.6, 1.6)
    for i, (image, cam) in enumerate(zip(images, cams)):
        row, col = 2 * (i // columns), i % columns
        axes[row, col].imshow(image)
        axes[row + 1, col].imshow(image)
        axes[row + 1, col].imshow(cam, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    fig.suptitle("Test images and Grad-CAM of the SSL loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def save_pair_grid(images: np.ndarray, pair_a: np.ndarray, pair_b: np.ndarray, path: str,
                   titles=("image", "x_a = d(h)", "x_b = d(h') (perturbed)")) -> None:
    """One row per image: the image and the two images of its synthesized pair, side by side."""
    fig, axes = _hidden_axes(len(images), 3, 5.0 / 3, 1.7)
    for i, triplet in enumerate(zip(images, pair_a, pair_b)):
        for j, picture in enumerate(triplet):
            axes[i, j].imshow(picture)
            if i == 0:
                axes[i, j].set_title(titles[j], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def weight_phases(records: list, name: str = "pair_weight"):
    """(last step at weight 0, first step at full weight) of a term's logged weight, or None when the
    run logs none: the warm-up and ramp the loss figure marks."""
    points = [(r["step"], r[name]) for r in records if name in r]
    if not points:
        return None
    peak = max(weight for _, weight in points)
    off = [step for step, weight in points if weight == 0]
    full = [step for step, weight in points if weight >= peak and weight > 0]
    return (max(off) if off else None), (min(full) if full else None)


def save_loss_curves(metrics_jsonl: str, path: str) -> bool:
    """Each loss term and the pair weight against the step, from the run's metrics.jsonl, with the
    warm-up (weight 0, shaded) and the ramp (hatched) marked: the total rises when L_Cp switches on.
    False (nothing written) when no step was logged, e.g. a run of zero epochs."""
    records = read_jsonl(metrics_jsonl)
    names = [n for n in LOSS_CURVES if any(n in r for r in records)]
    if not names:
        return False
    phases = weight_phases(records)
    fig = Figure(figsize=(3.2 * len(names), 2.8))
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        points = [(r["step"], r[name]) for r in records if name in r]
        ax.plot(*zip(*points))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        if phases and phases[0] is not None:
            ax.axvspan(0, phases[0], color="0.85", label="warm-up: L_Cp off")
            if phases[1] is not None and phases[1] > phases[0]:
                ax.axvspan(phases[0], phases[1], facecolor="none", hatch="//", edgecolor="0.7", label="ramp")
    if phases and phases[0] is not None:
        fig.axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def write_figures(config, workdir: str, state, test_source, num_images: int = 8, stats_images: int = 64) -> list:
    """All figures of a run (process 0); returns the written paths.

    `stats_images` test images form the batch whose statistics the method uses (e.g. fgpair's variance
    criterion); the first `num_images` are shown.
    """
    if jax.process_index() != 0:
        return []
    directory = os.path.join(workdir, "figures")
    os.makedirs(directory, exist_ok=True)
    count = min(stats_images, len(test_source))
    stride = max(1, len(test_source) // count)  # spread over classes (the source is class-ordered)
    shown_nuisance = nuisance.Nuisance.of_config(config)  # the figures show what the encoder is evaluated on
    images = np.stack([nuisance.eval_image(pipeline.eval_transform(test_source[i * stride]["image"],
                                                                   config.data.image_size,
                                                                   config.data.eval_crop_fraction),
                                           i * stride, shown_nuisance) for i in range(count)])
    normalized = augment.normalize(jnp.asarray(images), *input_normalization(config.model))
    arrays = get_method(config.method).figure_arrays(state, normalized, jax.random.key(config.seed), config)
    shown = images[:num_images]
    written = [os.path.join(directory, "gradcam.png")]
    save_gradcam_overlays(shown, arrays["cam"][:num_images], written[-1])
    if "pair_a" in arrays:
        written.append(os.path.join(directory, "pairs.png"))
        save_pair_grid(shown, to_uint8_image(arrays["pair_a"][:num_images], config.model),
                       to_uint8_image(arrays["pair_b"][:num_images], config.model), written[-1],
                       titles=("image", *arrays["pair_titles"]))
    if arrays.get("diagnostics"):
        written.append(os.path.join(directory, "diagnostics.json"))
        with open(written[-1], "w") as f:
            json.dump(arrays["diagnostics"], f, indent=2, sort_keys=True)
    metrics_jsonl = os.path.join(workdir, "metrics.jsonl")
    curves = os.path.join(directory, "loss_curves.png")
    if os.path.exists(metrics_jsonl) and save_loss_curves(metrics_jsonl, curves):
        written.append(curves)
    return written
