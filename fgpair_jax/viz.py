"""`write_figures`: every figure of a run in `<workdir>/figures/` (drawn by `fgpair_jax/figures/`).

  gradcam.png       test images and Grad-CAM of the SSL loss (should sit on the object), colour bar, step
  pairs.png         fgpair: each image beside its synthesized pair, the variant, per-pair contrast
  diagnostics.json  fgpair: the pair's numbers (`fgpair.pair_diagnostics`)
  loss_curves.png   each loss term, the total's formula and the config's warm-up / ramp
  retrieval.png     test queries and their top-5 cosine neighbours, green same class / red another
  embedding.png     the test features in 2-D (UMAP with `.[umap]`, else PCA) coloured by class

They are how a person checks the method is doing what it claims. What a method shows is its own
(`Method.figure_arrays`); the figures only draw.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from fgpair_jax.data import augment, nuisance, pipeline
from fgpair_jax.figures.embedding import save_run_embedding
from fgpair_jax.figures.gradcam import save_gradcam_overlays
from fgpair_jax.figures.images import to_uint8_image
from fgpair_jax.figures.losses import save_loss_curves
from fgpair_jax.figures.pairs import LOOK_FOR as PAIRS_LOOK_FOR, save_pair_grid
from fgpair_jax.figures.retrieval import choose_queries, nearest_neighbours, save_retrieval_grid
from fgpair_jax.methods import get_method
from fgpair_jax.models import input_normalization

RETRIEVAL_QUERIES, RETRIEVAL_NEIGHBOURS = 6, 5


def run_label(config) -> str:
    """What trained, for figure titles: 'fgpair (base simsiam) / resnet18', 'moco / resnet18'."""
    return f"{get_method(config.method).label(config)} / {config.model.name}"


def eval_images(config, test_source, indices) -> np.ndarray:
    """[len(indices), S, S, 3] uint8: the test images at `indices` as the evaluation encodes them
    (centre crop, and the run's evaluation nuisance, `nuisance.eval_image`)."""
    shown_nuisance = nuisance.Nuisance.of_config(config)
    return np.stack([nuisance.eval_image(pipeline.eval_transform(test_source[int(i)]["image"], config.data.image_size,
                                                                 config.data.eval_crop_fraction),
                                         int(i), shown_nuisance) for i in indices])


def _pairs_title(config, arrays: dict, count: int) -> str:
    """'fgpair / resnet18: <the variant>; mean contrast over 64 test images 0.176' (the last part when the
    method's diagnostics give pair_contrast), from the method's `figure_arrays`."""
    title = f"{config.method} / {config.model.name}: {arrays['pair_variant']}"
    diagnostics = arrays.get("diagnostics", {})
    if "pair_contrast" in diagnostics:
        title += f"; mean contrast over {count} {config.data.eval_split} images {diagnostics['pair_contrast']:.3f}"
    return title


def write_retrieval_figure(config, workdir: str, test_source, path: str, run: str, step) -> bool:
    """retrieval.png from `<workdir>/eval/features.npz` (its test rows are the test source in order) and
    the test images; False (nothing written) when the features are missing or no class has two images."""
    features_path = os.path.join(workdir, "eval", "features.npz")
    if not os.path.isfile(features_path):
        return False
    with np.load(features_path) as saved:
        features, labels = saved["test_features"], saved["test_labels"]
    queries = choose_queries(labels, RETRIEVAL_QUERIES)
    if queries.size == 0:
        return False
    neighbours, similarities, correct = nearest_neighbours(features, labels, queries, RETRIEVAL_NEIGHBOURS)
    shown = eval_images(config, test_source, np.concatenate([queries, neighbours.ravel()]))
    save_retrieval_grid(shown[:queries.size], shown[queries.size:].reshape(*neighbours.shape, *shown.shape[1:]),
                        labels[queries], labels[neighbours], similarities, correct, path, run=run, step=step,
                        split=config.data.eval_split)
    return True


def write_figures(config, workdir: str, state, test_source, num_images: int = 8, stats_images: int = 64) -> list:
    """All figures of a finished run (process 0), after its evaluation; returns the written paths.

    `stats_images` test images form the batch whose statistics the method uses (e.g. fgpair's variance
    criterion); the first `num_images` are shown. The retrieval and embedding figures read
    `<workdir>/eval/features.npz`; the loss figure `<workdir>/metrics.jsonl`.
    """
    if jax.process_index() != 0:
        return []
    directory = os.path.join(workdir, "figures")
    os.makedirs(directory, exist_ok=True)
    step = int(jax.device_get(state.step))
    # A finished run's step is num_epochs x steps_per_epoch (run.plan): the schedule's step axis.
    steps_per_epoch = step // config.num_epochs if config.num_epochs and step else None
    run = run_label(config)
    count = min(stats_images, len(test_source))
    stride = max(1, len(test_source) // count)  # spread over classes (the source is class-ordered)
    images = eval_images(config, test_source, [i * stride for i in range(count)])
    normalized = augment.normalize(jnp.asarray(images), *input_normalization(config.model))
    arrays = get_method(config.method).figure_arrays(state, normalized, jax.random.key(config.seed), config)
    shown = images[:num_images]
    written = [os.path.join(directory, "gradcam.png")]
    save_gradcam_overlays(shown, arrays["cam"][:num_images], written[-1], step=step, run=run)
    if "pair_a" in arrays:
        written.append(os.path.join(directory, "pairs.png"))
        save_pair_grid(shown, to_uint8_image(arrays["pair_a"][:num_images], config.model),
                       to_uint8_image(arrays["pair_b"][:num_images], config.model), written[-1],
                       titles=("image", *arrays["pair_titles"]), step=step, look_for=PAIRS_LOOK_FOR,
                       title=_pairs_title(config, arrays, count),
                       row_notes=[f"contrast {value:.3f}" for value in arrays["pair_contrast_each"][:num_images]])
    if arrays.get("diagnostics"):
        written.append(os.path.join(directory, "diagnostics.json"))
        with open(written[-1], "w") as f:
            json.dump(arrays["diagnostics"], f, indent=2, sort_keys=True)
    metrics_jsonl = os.path.join(workdir, "metrics.jsonl")
    curves = os.path.join(directory, "loss_curves.png")
    if os.path.exists(metrics_jsonl) and save_loss_curves(metrics_jsonl, curves, get_method(config.method).loss_schedule(config),
                                                                steps_per_epoch):
        written.append(curves)
    retrieval = os.path.join(directory, "retrieval.png")
    if write_retrieval_figure(config, workdir, test_source, retrieval, run, step):
        written.append(retrieval)
    features_path = os.path.join(workdir, "eval", "features.npz")
    if os.path.isfile(features_path):
        with np.load(features_path) as saved:
            written.append(os.path.join(directory, "embedding.png"))
            save_run_embedding(saved["test_features"], saved["test_labels"], written[-1], run=run, step=step,
                               seed=config.seed, split=config.data.eval_split)
    return written
