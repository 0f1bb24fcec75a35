"""Leave-one-out image retrieval (rank-1, rank-5, mAP) with cosine similarity on frozen features.

The fine-grained SSL literature reports retrieval on the test split where every image queries all the
other images of that split; a hit is an image of the same class. We rank the whole split per query, so
mAP is the exact average precision over the full ranking, not a truncated one.

Queries are processed in fixed-size blocks (the last one padded) so memory is O(block_size x N), not
O(N^2) at once, and the jitted similarity matmul compiles once. Similarities use the highest matmul
precision: accelerators default to bf16 matmuls, which would reorder near neighbours.

This module also holds the input checks and the L2 normalisation shared by `knn` and `linear_probe`,
so all three metrics read features the same way.
"""
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fgpair_jax.evaluation import MetricUnavailable

_HIGHEST = jax.lax.Precision.HIGHEST
RANKS = (1, 5)


def check_features_and_labels(features, labels, name: str) -> tuple[np.ndarray, np.ndarray]:
    """`features` [N,D] float32 and `labels` [N] int32 as numpy, or a one-line error naming the fix."""
    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2:
        raise ValueError(f"{name} features must be [N, D]; got shape {features.shape}. Pool/flatten first.")
    if not np.issubdtype(features.dtype, np.floating):
        raise ValueError(f"{name} features must be floating point; got {features.dtype}. Cast to float32.")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"{name} labels must be [N] with N={features.shape[0]} like the features; got {labels.shape}."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} labels must be integers; got {labels.dtype}. Map class names to ids first.")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} labels must be >= 0; got min {labels.min()}. Remap class ids to 0..C-1.")
    if features.shape[0] == 0:
        raise ValueError(f"{name} split is empty; extract features for at least one image.")
    if not np.all(np.isfinite(features)):
        raise ValueError(f"{name} features contain NaN or inf; check the encoder output.")
    return features.astype(np.float32), labels.astype(np.int32)


def check_train_test(train_features, train_labels, test_features, test_labels, num_classes, name: str) -> int:
    """Both splits have the same feature width; returns num_classes (default 1 + the largest label)."""
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"{name} train and test features differ in width ({train_features.shape[1]} vs "
            f"{test_features.shape[1]}); extract both with the same encoder."
        )
    largest_label = int(max(train_labels.max(), test_labels.max()))
    num_classes = largest_label + 1 if num_classes is None else num_classes
    if num_classes <= largest_label:
        raise ValueError(f"{name} num_classes={num_classes} but a label is {largest_label}; pass more.")
    return num_classes


def l2_normalize(features, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), so dot products are cosine similarities."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, eps)


def cosine_similarities(queries: jax.Array, gallery: jax.Array) -> jax.Array:
    """[B,N] dot products of unit rows at full float32 precision, with -0.0 canonicalised to +0.0.

    The canonicalisation matters for ranking: sorts compare floats in total order, where -0.0 < +0.0,
    and equal similarities must tie so that the index decides.
    """
    similarities = jnp.dot(queries, gallery.T, precision=_HIGHEST)
    return jnp.where(similarities == 0, 0.0, similarities)


_block_similarities = jax.jit(cosine_similarities)


def _rank_block(similarities: np.ndarray, query_labels, query_indices, gallery_labels):
    """Per-query hits at RANKS, average precision and whether the query has any positive.

    The ranking runs in numpy: its stable sort is several times faster than XLA's on CPU, and the
    similarity matmul (the part accelerators speed up) has already run on the device.
    """
    similarities = similarities.copy()
    similarities[np.arange(query_indices.size), query_indices] = -np.inf
    # Stable argsort of -similarity breaks ties by the lower gallery index. The query itself (-inf,
    # the only infinite similarity) sorts last; dropping the last column leaves the N-1 others.
    order = np.argsort(-similarities, axis=1, kind="stable")[:, :-1]
    relevant = gallery_labels[order] == query_labels[:, None]
    num_relevant = relevant.sum(axis=1)
    ranks = np.arange(1, order.shape[1] + 1, dtype=np.float32)
    precision_at_rank = np.cumsum(relevant, axis=1, dtype=np.int32) / ranks
    average_precision = np.where(relevant, precision_at_rank, 0.0).sum(axis=1) / np.maximum(num_relevant, 1)
    hits = {k: relevant[:, :k].any(axis=1) for k in RANKS}
    return hits, average_precision, num_relevant > 0


def unavailable_reason(labels) -> Optional[str]:
    """Why leave-one-out retrieval is undefined on a split with these [N] labels, or None if it is not:
    it needs a class with two or more images (a query with a positive)."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    if counts.size and counts.max() >= 2:
        return None
    return (f"retrieval needs a class with two or more images in the evaluated split, and each of its "
            f"{counts.size} classes has one")


def retrieval_metrics(features, labels, *, block_size: int = 1024) -> Dict[str, float]:
    """Leave-one-out cosine retrieval on one split: {"rank1", "rank5", "map"} in percent.

    Each image queries all OTHER images of the split, ranked by cosine similarity (ties broken by the
    lower image index, so results are deterministic). rank-k is the % of queries with at least one
    same-label image among the k most similar; mAP is the mean over queries of the average precision
    of the full ranking: AP = (1/R) * sum over positives at rank r of (#positives within the top r)/r.

    Queries whose class has no other image in the split (singletons) have no defined AP; they are
    EXCLUDED from all three numbers (they would otherwise count as guaranteed misses). They still act
    as gallery distractors for the other queries. If no query has a positive, `MetricUnavailable` (a
    ValueError) is raised.

    Args:
      features: [N, D] float features, not necessarily normalised (rows are L2-normalised here, so
        per-row scaling changes nothing).
      labels: [N] non-negative int class ids.
      block_size: queries per block; memory is about 40 * block_size * N bytes. Results do not
        depend on it.
    """
    features, labels = check_features_and_labels(features, labels, "retrieval")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size}.")
    num_images = features.shape[0]
    features = l2_normalize(features)
    block_size = min(block_size, num_images)
    gallery_features = jnp.asarray(features)

    hit_counts = {k: 0 for k in RANKS}
    ap_sum, num_valid = 0.0, 0
    for start in range(0, num_images, block_size):
        indices = np.arange(start, min(start + block_size, num_images))
        # Pad the last block to block_size so the jitted matmul compiles once; drop the pad after.
        query_features = np.zeros((block_size, features.shape[1]), np.float32)
        query_features[: indices.size] = features[indices]
        similarities = np.asarray(_block_similarities(query_features, gallery_features))[: indices.size]
        hits, average_precision, has_positive = _rank_block(similarities, labels[indices], indices, labels)
        for k in RANKS:
            hit_counts[k] += int(np.sum(hits[k] & has_positive))
        ap_sum += float(np.sum(average_precision[has_positive]))
        num_valid += int(np.sum(has_positive))

    if num_valid == 0:
        raise MetricUnavailable(unavailable_reason(labels))
    metrics = {f"rank{k}": 100.0 * hit_counts[k] / num_valid for k in RANKS}
    metrics["map"] = 100.0 * ap_sum / num_valid
    return metrics
