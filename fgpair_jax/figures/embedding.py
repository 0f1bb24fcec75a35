"""embedding.png: a 2-D map of a run's test features coloured by class, and the comparison table's
side-by-side of two runs (`write_side_by_side`).

The map is UMAP (umap-learn, the optional extra `.[umap]`) when it is installed and the split has at
least `UMAP_MIN_POINTS` images, else PCA, and the figure's title says which. UMAP shows neighbourhoods
(what retrieval and kNN score) and is what the field shows; it is optional because it brings numba and
scikit-learn and costs CPU minutes per map where PCA costs a fraction of a second (measured:
results/README.md, `benchmarks/embedding_cost.py`). PCA is exact but linear: classes that UMAP separates
can overlap in it.
"""
import json
import os

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from scipy import linalg as scipy_linalg

from fgpair_jax.evaluation.retrieval import l2_normalize
from fgpair_jax.figures.images import save, step_text, text_inches, wrapped

UMAP_MIN_POINTS = 100  # fewer images than this: PCA (UMAP's 15-neighbour graph would be most of the split)
UMAP_NEIGHBOURS, UMAP_MIN_DIST, UMAP_INPUT_DIMS = 15, 0.1, 50
MAX_COLOURED_CLASSES = 20  # distinguishable styles (`class_style`); further classes are drawn grey
LOOK_FOR = ("What to look for: images of one class (one colour) should form a tight group apart from the "
            "other classes; grey points are the classes not coloured. The axes have no units.")


def _umap():
    """The umap module, or None when the optional extra is not installed."""
    try:
        import umap  # heavy (numba): imported only when a map is drawn
    except ImportError:
        return None
    return umap


def principal_components(features: np.ndarray, count: int) -> np.ndarray:
    """[N, count] float64 coordinates of the centred `features` [N, D] on their first `count` principal
    axes, each signed so that its largest-magnitude loading is positive (deterministic); axes beyond
    min(N, D) are zeros. The top eigenvectors of the smaller of X^T X and X X^T (scipy's subset `eigh`):
    several times less CPU than a full SVD at N, D in the thousands."""
    centred = np.asarray(features, np.float64) - np.mean(features, axis=0, dtype=np.float64)
    n, d = centred.shape
    k = min(count, n, d)
    if d <= n:
        _, vectors = scipy_linalg.eigh(centred.T @ centred, subset_by_index=[d - k, d - 1])
        axes = vectors[:, ::-1].T
    else:  # the axes from the Gram matrix's eigenvectors u: X^T u / ||X^T u||
        _, vectors = scipy_linalg.eigh(centred @ centred.T, subset_by_index=[n - k, n - 1])
        axes = (centred.T @ vectors[:, ::-1]).T
        axes /= np.maximum(np.linalg.norm(axes, axis=1, keepdims=True), 1e-300)
    if k < count:
        axes = np.concatenate([axes, np.zeros((count - k, d))])
    signs = np.sign(axes[np.arange(count), np.argmax(np.abs(axes), axis=1)])
    return centred @ (axes * np.where(signs == 0, 1.0, signs)[:, None]).T


def project_2d(features, seed: int = 0, method: str = "auto"):
    """(coordinates [N, 2] float64, what they are: a phrase for the title) of `features` [N, D] after L2
    normalisation (the geometry retrieval and kNN use). method 'auto': UMAP when umap-learn is importable
    and N >= UMAP_MIN_POINTS, else PCA; 'pca': PCA. UMAP (seeded by `seed`, so reproducible) runs on the
    first UMAP_INPUT_DIMS principal components."""
    unit = l2_normalize(features)
    if method == "pca":
        return principal_components(unit, 2), "PCA"
    if unit.shape[0] < UMAP_MIN_POINTS:  # decided before importing umap (seconds of numba)
        return principal_components(unit, 2), f"PCA (UMAP needs >= {UMAP_MIN_POINTS} images)"
    umap = _umap()
    if umap is None:
        return principal_components(unit, 2), "PCA (pip install -e '.[umap]' for UMAP)"
    reduced = principal_components(unit, min(UMAP_INPUT_DIMS, *unit.shape))
    reducer = umap.UMAP(n_components=2, n_neighbors=UMAP_NEIGHBOURS, min_dist=UMAP_MIN_DIST, random_state=seed,
                        n_jobs=1)  # a seed makes UMAP single-threaded; saying so avoids its warning
    return (np.asarray(reducer.fit_transform(reduced), np.float64),
            f"UMAP ({UMAP_NEIGHBOURS} neighbours, min_dist {UMAP_MIN_DIST})")


def coloured_classes(labels, limit: int = MAX_COLOURED_CLASSES) -> np.ndarray:
    """The class ids [<= limit] drawn in colour: all when there are at most `limit`, else `limit` evenly
    spaced over the sorted ids (the same ones in every run of a data set, so side-by-side panels match)."""
    classes = np.unique(np.asarray(labels))
    if classes.size <= limit:
        return classes
    return classes[np.linspace(0, classes.size - 1, limit).round().astype(np.int64)]


def class_style(position: int) -> dict:
    """Scatter style of the `position`-th coloured class: tab10's colours, circles then triangles (20
    distinguishable styles; tab20's light/dark pairs are hard to tell apart)."""
    return {"color": colormaps["tab10"](position % 10), "marker": "o^sD"[(position // 10) % 4]}


def save_embeddings(panels, path: str, heading: str) -> None:
    """One scatter panel per (coordinates [N, 2], labels [N] int, panel title) of `panels`, the classes of
    `coloured_classes` (of the first panel's labels) in colour with a legend, the others grey, under
    `heading` and the caption of what to look for."""
    first = np.asarray(panels[0][1])
    coloured = coloured_classes(first)
    shown = (f"all {coloured.size} classes coloured" if coloured.size == np.unique(first).size else
             f"{coloured.size} of {np.unique(first).size} classes coloured (evenly spaced ids), the rest grey")
    width = 5.0 * len(panels) + 1.4
    title = wrapped(f"{heading}; {shown}", int(13 * width))
    note = wrapped(LOOK_FOR, int(16 * width))
    fig = Figure(figsize=(width, 4.6 + text_inches(title, 10) + text_inches(note, 8)))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (coordinates, labels, panel_title) in zip(axes, panels):
        labels = np.asarray(labels)
        rest = ~np.isin(labels, coloured)
        ax.scatter(*coordinates[rest].T, s=4, color="0.8", linewidths=0, label="other classes" if rest.any() else None)
        for i, label in enumerate(coloured):
            chosen = labels == label
            ax.scatter(*coordinates[chosen].T, s=12, linewidths=0, label=f"class {int(label)}", **class_style(i))
        ax.set_title(wrapped(panel_title, 60), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=1.5, frameon=False)
    height = fig.get_figheight()
    fig.suptitle(title, fontsize=10, y=1 - 0.05 / height, va="top")
    fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=8, color="0.25")
    fig.tight_layout(rect=(0, (text_inches(note, 8) + 0.1) / height, 1, 1))  # it makes room for the suptitle
    save(fig, path)


def save_run_embedding(features, labels, path: str, run: str = "", step=None, seed: int = 0,
                       split: str = "test") -> str:
    """embedding.png of one run's features [N, D] and labels [N] of the evaluated `split`; returns the
    projection's phrase (`project_2d`)."""
    coordinates, how = project_2d(features, seed)
    save_embeddings([(coordinates, labels, f"{run or 'features'}{step_text(step)}")], path,
                    f"Features of the {split} split in 2-D: {how} of the L2-normalised features")
    return how


def _panel_title(run: str, metrics_path: str) -> str:
    """'fgpair_seed0: retrieval rank-1 61.9%, linear top-1 76.5%' from the run's eval/metrics.json if any."""
    if not os.path.isfile(metrics_path):
        return run
    with open(metrics_path) as f:
        metrics = json.load(f)
    numbers = [f"{name} {metrics[key]:.1f}%" for key, name in (("retrieval_rank1", "retrieval rank-1"),
                                                               ("linear_top1", "linear top-1"))
               if isinstance(metrics.get(key), (int, float))]
    return f"{run}: " + ", ".join(numbers) if numbers else run


def compared_runs(runs: dict, compared_arms):
    """((arm, seed), (arm, seed)) of the first pair of `compared_arms` ((reference arm, arm), ...:
    `methods.COMPARED_ARMS`) that both finished a common seed (the lowest), or None. `runs`: {(arm, seed):
    path of eval/features.npz} (`experiments.finished_features`)."""
    for reference, method in compared_arms:
        seeds = sorted({s for a, s in runs if a == reference} & {s for a, s in runs if a == method})
        if seeds:
            return (reference, seeds[0]), (method, seeds[0])
    return None


def write_side_by_side(results: str, runs: dict, compared_arms):
    """`<results>/embedding_<a>_vs_<b>_seed<s>.png`: the 2-D maps of two runs' test features side by side
    (`compared_runs`), each panel its own projection titled with the run's retrieval rank-1 and linear
    top-1; returns its path, or None when no pair of runs finished."""
    pair = compared_runs(runs, compared_arms)
    if pair is None:
        return None
    panels, how = [], ""
    for arm, seed in pair:
        with np.load(runs[(arm, seed)]) as saved:
            features, labels = saved["test_features"], saved["test_labels"]
        coordinates, how = project_2d(features, seed)
        metrics = os.path.join(os.path.dirname(runs[(arm, seed)]), "metrics.json")
        panels.append((coordinates, labels, _panel_title(f"{arm}_seed{seed}", metrics)))
    (a, seed), (b, _) = pair
    path = os.path.join(results, f"embedding_{a}_vs_{b}_seed{seed}.png")
    save_embeddings(panels, path, f"Features of the evaluated split, {a} and {b} (seed {seed}), in 2-D: {how} of the "
                                  "L2-normalised features, each panel its own projection (compare how tight "
                                  "the classes are, not where they lie)")
    return path
