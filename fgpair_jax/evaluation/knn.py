"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018; DINO's monitor).

Cheap enough to run during training: no fitting, one similarity matrix per block of test queries.
Each of the k most cosine-similar train images votes for its label with weight exp(similarity / T);
the class with the largest summed vote wins. T sharpens the vote towards the closest neighbours.

Numerics: the weights are computed as exp((similarity - s_max) / T), s_max being the query's largest
similarity. That scales every class's vote of one query by the same exp(-s_max / T), so the winner is
unchanged, but no weight exceeds 1: exp(similarity / T) itself overflows float32 once similarity / T > 88
(T = 0.01 with a near-duplicate neighbour), and the inf/NaN votes made every prediction class 0.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from fgpair_jax.evaluation import MetricUnavailable
from fgpair_jax.evaluation.retrieval import (check_features_and_labels, check_train_test, cosine_similarities,
                                             l2_normalize)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _predict_block(test_features, train_features, train_labels, temperature, *, k, num_classes):
    """Predicted class (integer [B]) per test row of float32 [B, d]. Ties: top_k keeps the lower train
    index; argmax the lower class. Weights are max-subtracted (module docstring): in [0, 1], 1 for the nearest."""
    similarities = cosine_similarities(test_features, train_features)
    top_similarities, top_indices = jax.lax.top_k(similarities, k)  # sorted: column 0 is the largest
    weights = jnp.exp((top_similarities - top_similarities[:, :1]) / temperature)
    votes = jnp.einsum("bk,bkc->bc", weights, jax.nn.one_hot(train_labels[top_indices], num_classes))
    return jnp.argmax(votes, axis=1)


def unavailable_reason(num_train: int, k: int) -> Optional[str]:
    """Why a k-NN vote over `num_train` train images is undefined (fewer images than neighbours), or None."""
    if k <= num_train:
        return None
    return f"kNN with k={k} neighbours needs at least {k} train images, the train split has {num_train}"


def knn_top1(
    train_features,
    train_labels,
    test_features,
    test_labels,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    block_size: int = 1024,
) -> float:
    """Top-1 accuracy (percent) of the exp(cos/T)-weighted k-NN vote of the train split on the test split.

    Features need not be normalised (rows are L2-normalised here). `num_classes` defaults to
    1 + the largest label of either split; it only sizes the vote table. `block_size` bounds memory
    (about 4 * block_size * N_train bytes) and does not change the result.

    Raises `MetricUnavailable` when k exceeds the train images, ValueError for malformed inputs.
    """
    train_features, train_labels = check_features_and_labels(train_features, train_labels, "kNN train")
    test_features, test_labels = check_features_and_labels(test_features, test_labels, "kNN test")
    num_classes = check_train_test(train_features, train_labels, test_features, test_labels, num_classes, "kNN")
    if k < 1:
        raise ValueError(f"kNN k={k} must be >= 1.")
    reason = unavailable_reason(train_features.shape[0], k)
    if reason:
        raise MetricUnavailable(reason)
    if temperature <= 0:
        raise ValueError(f"kNN temperature must be > 0; got {temperature}.")

    train_features, test_features = l2_normalize(train_features), l2_normalize(test_features)
    num_test = test_features.shape[0]
    block_size = min(block_size, num_test)
    train_features, train_labels = jnp.asarray(train_features), jnp.asarray(train_labels)
    correct = 0
    for start in range(0, num_test, block_size):
        stop = min(start + block_size, num_test)
        block = np.zeros((block_size, test_features.shape[1]), np.float32)
        block[: stop - start] = test_features[start:stop]
        predictions = _predict_block(
            block, train_features, train_labels, jnp.float32(temperature), k=k, num_classes=num_classes
        )
        correct += int(np.sum(np.asarray(predictions)[: stop - start] == test_labels[start:stop]))
    return 100.0 * correct / num_test
