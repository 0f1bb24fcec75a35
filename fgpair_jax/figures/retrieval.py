"""retrieval.png: a few test queries and their top-k cosine neighbours among the other test images,
framed green (same class) or red (another class), as fine-grained retrieval papers show it."""
import jax.numpy as jnp
import numpy as np

from fgpair_jax.evaluation.retrieval import check_features_and_labels, cosine_similarities, l2_normalize
from fgpair_jax.figures.images import CORRECT, QUERY, WRONG, frame, image_grid, save, step_text, wrapped

LOOK_FOR = ("Each row: a query (blue frame) and the k other images of the split most cosine-similar to it in the "
            "encoder's features, most similar first, as the retrieval metrics rank them (leave-one-out on the "
            "evaluated split). Green frame and \u2713: same class as the query; red and \u2717: another class. "
            "Good features put green frames first; red neighbours show which classes the encoder confuses.")


def choose_queries(labels, count: int) -> np.ndarray:
    """`count` query indices [<= count] int, chosen without randomness: evenly spaced over the images whose
    class has another image in the split (a query with a positive), so over the classes of a class-ordered
    split. `labels` [N] int."""
    labels = np.asarray(labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    candidates = np.flatnonzero(counts[inverse] >= 2)
    if candidates.size == 0 or count <= 0:
        return np.zeros((0,), np.int64)
    picks = np.unique(np.linspace(0, candidates.size - 1, min(count, candidates.size)).round().astype(np.int64))
    return candidates[picks]


def nearest_neighbours(features, labels, queries, k: int = 5):
    """(neighbours [Q, k] int indices, similarities [Q, k] float32, correct [Q, k] bool) of each query
    index in `queries` [Q] among the OTHER images of the split: cosine similarity of the L2-normalised
    `features` [N, D], most similar first, ties broken by the lower index, exactly as
    `evaluation.retrieval.retrieval_metrics` ranks them; `correct` is neighbour label == query label.
    k is capped at N - 1. Raises ValueError for malformed features or labels (`check_features_and_labels`)."""
    features, labels = check_features_and_labels(features, labels, "retrieval figure")
    queries = np.asarray(queries, np.int64)
    unit = l2_normalize(features)
    similarities = np.array(cosine_similarities(jnp.asarray(unit[queries]), jnp.asarray(unit)))
    similarities[np.arange(queries.size), queries] = -np.inf  # leave the query itself out
    k = min(k, features.shape[0] - 1)
    order = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
    return (order, np.take_along_axis(similarities, order, axis=1).astype(np.float32),
            labels[order] == labels[queries][:, None])


def save_retrieval_grid(query_images, neighbour_images, query_labels, neighbour_labels, similarities, correct,
                        path: str, run: str = "", step=None, split: str = "test") -> None:
    """One row per query: the query ([Q, S, S, 3] uint8) then its k neighbours ([Q, k, S, S, 3] uint8),
    each titled with its class id and cosine similarity and framed green (`correct` [Q, k] True) or red;
    the title gives the run, the evaluated `split`, the step and these queries' rank-1 and rank-k hits."""
    correct = np.asarray(correct)
    count, k = correct.shape
    heading = (f"{run + ': ' if run else ''}{split}-split retrieval{step_text(step)}: top-{k} cosine neighbours "
               f"of {count} queries; rank-1 correct {int(correct[:, 0].sum())}/{count}, "
               f"rank-{k} {int(correct.any(axis=1).sum())}/{count}")
    fig, axes = image_grid(count, k + 1, 1.55, 1.75, title=wrapped(heading, 17 * (k + 1)),
                           note=wrapped(LOOK_FOR, 20 * (k + 1)))
    for row in range(count):
        axes[row, 0].imshow(query_images[row])
        axes[row, 0].set_title(f"query, class {int(query_labels[row])}", fontsize=7, color=QUERY)
        frame(axes[row, 0], QUERY)
        for j in range(k):
            ax = axes[row, j + 1]
            ax.imshow(neighbour_images[row][j])
            mark = "\u2713" if correct[row][j] else "\u2717"  # check / cross: not by colour alone
            ax.set_title(f"#{j + 1} {mark} class {int(neighbour_labels[row][j])}\ncos {similarities[row][j]:.3f}",
                         fontsize=7, color=CORRECT if correct[row][j] else WRONG)
            frame(ax, CORRECT if correct[row][j] else WRONG)
    save(fig, path)
