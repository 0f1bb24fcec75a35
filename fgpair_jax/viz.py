"""Figures in `<workdir>/figures/`: Grad-CAM overlays, synthesized-pair triplets, loss curves.

They are how a person checks the method is doing what it claims: Grad-CAM should sit on the bird,
reconstructions should look like birds, and perturbed renderings should differ from them only in
details the encoder is asked to ignore.
"""
import os

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fgpair_jax import gradcam, synthesis  # noqa: E402
from fgpair_jax.data import augment, pipeline  # noqa: E402
from fgpair_jax.metrics_writer import read_jsonl  # noqa: E402
from fgpair_jax.methods import fgpair, moco  # noqa: E402
from fgpair_jax.models import input_normalization  # noqa: E402

LOSS_CURVES = ("loss", "loss_contrastive", "loss_reconstruction", "loss_pair", "loss_attention_kl")


def to_uint8_image(normalized: np.ndarray, model_config) -> np.ndarray:
    """Encoder-space (normalised) float images -> displayable uint8 RGB."""
    mean, std = (np.asarray(v) for v in input_normalization(model_config))
    return (np.clip(normalized * std + mean, 0.0, 1.0) * 255).round().astype(np.uint8)


def figure_arrays(params, state, images_uint8, rng, config) -> dict:
    """Grad-CAM maps of L_C (frozen encoder, running BN stats) and, for fgpair, the synthesized pair.

    Keys come from the momentum encoder on the same images and negatives from the state's queue, so
    the map shows what the SSL objective attends to. Returns numpy arrays: 'cam' [B, S, S] in [0, 1],
    and with a decoder 'reconstruction', 'perturbed' (uint8 images) and 'mask' [D].
    """
    images = augment.normalize(images_uint8, *input_normalization(config.model))
    query, _ = moco.embed(params, state.batch_stats, images, config, train=False)
    keys, _ = moco.embed(state.ema_params, state.ema_batch_stats, images, config, train=False)
    loss_of_map = moco.contrastive_loss_of_feature_map(params, keys.projection, state.queue, config)
    gradient = gradcam.loss_gradient_wrt_feature_map(loss_of_map, query.feature_map)
    cam = gradcam.gradcam_maps(query.feature_map, gradient)
    cam = cam / jnp.maximum(jnp.max(cam, axis=(1, 2), keepdims=True), 1e-12)
    size = images.shape[1]
    out = {"cam": jax.image.resize(cam, (cam.shape[0], size, size), "bilinear")}
    if "decoder" in params:
        importance = gradcam.channel_importance(query.feature_map, gradient, config.fgpair.gradcam_score)
        variance = synthesis.feature_variance(query.pooled, relative=config.fgpair.relative_variance)
        mask_rng, perturb_rng = jax.random.split(rng)
        mask = fgpair.nondiscriminative_mask(mask_rng, importance, variance, config)
        reconstruction, perturbed = fgpair.synthesize_pair(params, query.pooled, mask, perturb_rng, config)
        out.update(reconstruction=reconstruction, perturbed=perturbed, mask=mask)
    return jax.device_get(out)


def save_gradcam_overlays(images: np.ndarray, cams: np.ndarray, path: str, columns: int = 8) -> None:
    rows = 2 * int(np.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (image, cam) in enumerate(zip(images, cams)):
        row, col = 2 * (i // columns), i % columns
        axes[row, col].imshow(image)
        axes[row + 1, col].imshow(image)
        axes[row + 1, col].imshow(cam, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    fig.suptitle("Test images and Grad-CAM of the SSL loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_pair_grid(images: np.ndarray, reconstructions: np.ndarray, perturbed: np.ndarray, path: str,
                   titles=("image", "decoded h", "decoded h' (perturbed)")) -> None:
    """One row per image: the image and two renderings of it, side by side."""
    fig, axes = plt.subplots(len(images), 3, figsize=(5.0, 1.7 * len(images)), squeeze=False)
    for i, triplet in enumerate(zip(images, reconstructions, perturbed)):
        for j, picture in enumerate(triplet):
            axes[i, j].imshow(picture)
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(titles[j], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_loss_curves(metrics_jsonl: str, path: str) -> bool:
    """Each loss term against the step, from the run's metrics.jsonl; False (nothing written) when no
    step was logged, e.g. a run of zero epochs."""
    records = read_jsonl(metrics_jsonl)
    names = [n for n in LOSS_CURVES if any(n in r for r in records)]
    if not names:
        return False
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        points = [(r["step"], r[name]) for r in records if name in r]
        ax.plot(*zip(*points))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_figures(config, workdir: str, state, test_source, num_images: int = 8, stats_images: int = 64) -> list:
    """All figures of a run (process 0); returns the written paths.

    `stats_images` test images set the batch variance of the mask; the first `num_images` are shown.
    """
    if jax.process_index() != 0:
        return []
    directory = os.path.join(workdir, "figures")
    os.makedirs(directory, exist_ok=True)
    count = min(stats_images, len(test_source))
    stride = max(1, len(test_source) // count)  # spread over classes (the source is class-ordered)
    images = np.stack([pipeline.eval_transform(test_source[i * stride]["image"], config.data.image_size)
                       for i in range(count)])
    arrays = figure_arrays(state.params, state, jnp.asarray(images), jax.random.key(config.seed), config)
    shown = images[:num_images]
    written = [os.path.join(directory, "gradcam.png")]
    save_gradcam_overlays(shown, arrays["cam"][:num_images], written[-1])
    if "reconstruction" in arrays:
        written.append(os.path.join(directory, "pairs.png"))
        save_pair_grid(shown, to_uint8_image(arrays["reconstruction"][:num_images], config.model),
                       to_uint8_image(arrays["perturbed"][:num_images], config.model), written[-1])
    metrics_jsonl = os.path.join(workdir, "metrics.jsonl")
    curves = os.path.join(directory, "loss_curves.png")
    if os.path.exists(metrics_jsonl) and save_loss_curves(metrics_jsonl, curves):
        written.append(curves)
    return written
