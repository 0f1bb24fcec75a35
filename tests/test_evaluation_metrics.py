"""Evaluation metrics against slow pure-python references, hand-computed cases and invariances.

The linear-probe tests share one problem shape (200 train x 16 dims x 4 classes) so the L-BFGS loop
compiles once for the whole file.
"""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from fgpair_jax.data.splits import stratified_split
from fgpair_jax.evaluation import MetricUnavailable
from fgpair_jax.evaluation.knn import knn_top1
from fgpair_jax.evaluation.linear_probe import _fit_softmax_regression, linear_probe
from fgpair_jax.evaluation.retrieval import retrieval_metrics
from fgpair_jax.evaluation.similarity import linear_cka

# ----------------------------------------------------------------------------------------------------
# Slow references: loops, explicit sorts, definitions.


def _cosine_matrix(features):
    features = np.asarray(features, np.float64)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    return unit @ unit.T


def reference_retrieval(features, labels):
    """Rank-1/5 and mAP (percent) by definition, over queries that have a positive."""
    similarity = _cosine_matrix(features)
    n = len(labels)
    rank1 = rank5 = 0
    average_precisions = []
    for query in range(n):
        ranking = sorted((j for j in range(n) if j != query), key=lambda j: (-similarity[query, j], j))
        relevant = [labels[j] == labels[query] for j in ranking]
        if not any(relevant):
            continue
        rank1 += any(relevant[:1])
        rank5 += any(relevant[:5])
        found, precisions = 0, []
        for rank, is_relevant in enumerate(relevant, start=1):
            if is_relevant:
                found += 1
                precisions.append(found / rank)
        average_precisions.append(sum(precisions) / len(precisions))
    valid = len(average_precisions)
    mean_ap = sum(average_precisions) / valid
    return {"rank1": 100 * rank1 / valid, "rank5": 100 * rank5 / valid, "map": 100 * mean_ap}


def reference_knn(train_features, train_labels, test_features, test_labels, k, temperature):
    """Weighted k-NN accuracy (percent) by definition, in float64. Each class's vote sum(exp(s_j / T)) is
    compared as its logarithm (log-sum-exp), which orders votes the same and cannot overflow at small T."""
    train = np.asarray(train_features, np.float64)
    test = np.asarray(test_features, np.float64)
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    correct = 0
    for i in range(len(test)):
        similarity = [float(test[i] @ train[j]) for j in range(len(train))]
        neighbours = sorted(range(len(train)), key=lambda j: (-similarity[j], j))[:k]
        exponents = {}
        for j in neighbours:
            exponents.setdefault(train_labels[j], []).append(similarity[j] / temperature)
        log_votes = {c: _log_sum_exp(values) for c, values in exponents.items()}
        prediction = max(log_votes, key=lambda c: (log_votes[c], -c))
        correct += prediction == test_labels[i]
    return 100 * correct / len(test)


def _log_sum_exp(values):
    largest = max(values)
    return largest + math.log(sum(math.exp(v - largest) for v in values))


def _random_split(seed, n=40, dim=8, num_classes=5):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, num_classes, size=n)


# ----------------------------------------------------------------------------------------------------
# Retrieval.


def test_retrieval_hand_computed_case():
    # Five unit vectors on a circle at 0, 10, 30, 65, 105 degrees, labels A A B B A, plus a singleton
    # class C at 232.5 degrees, farther than every other point from each query (ranks last for all).
    # Rankings by angular distance (others of each query), then relevance and AP:
    #   q0 (A): 1(10) 2(30) 3(65) 4(105) C  -> A B B A : hits at 1,4 -> AP = (1/1 + 2/4)/2 = 0.75
    #   q1 (A): 0(10) 2(20) 3(55) 4(95)  C  -> A B B A : AP = 0.75
    #   q2 (B): 1(20) 0(30) 3(35) 4(75)  C  -> A A B A : hit at 3   -> AP = 1/3
    #   q3 (B): 2(35) 4(40) 1(55) 0(65)  C  -> B A A A : hit at 1   -> AP = 1
    #   q4 (A): 3(40) 2(75) 1(95) 0(105) C  -> B B A A : hits at 3,4 -> AP = (1/3 + 2/4)/2 = 5/12
    #   q5 (C): no other C -> excluded from every number.
    # rank-1 = 3/5 (q0, q1, q3); rank-5 = 5/5; mAP = (0.75 + 0.75 + 1/3 + 1 + 5/12) / 5 = 0.65.
    angles = np.deg2rad([0.0, 10.0, 30.0, 65.0, 105.0, 232.5])
    features = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    labels = np.array([0, 0, 1, 1, 0, 2])
    metrics = retrieval_metrics(features, labels)
    assert metrics == pytest.approx({"rank1": 60.0, "rank5": 100.0, "map": 65.0}, abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_matches_bruteforce_reference(seed):
    features, labels = _random_split(seed)
    expected = reference_retrieval(features, labels)
    assert retrieval_metrics(features, labels) == pytest.approx(expected, abs=1e-4)


def test_retrieval_exact_ties_are_broken_by_index():
    # One-hot features: similarities are exactly 0 or 1, so ties are everywhere and exact.
    rng = np.random.default_rng(3)
    directions = rng.integers(0, 3, size=30)
    features = np.eye(3, dtype=np.float32)[directions]
    labels = rng.integers(0, 4, size=30)
    expected = reference_retrieval(features, labels)
    assert retrieval_metrics(features, labels) == pytest.approx(expected, abs=1e-4)


def test_retrieval_is_invariant_to_per_row_scale():
    features, labels = _random_split(4)
    scales = 10.0 ** np.random.default_rng(5).uniform(-3, 3, size=(len(labels), 1))
    scaled = (features * scales).astype(np.float32)
    assert retrieval_metrics(scaled, labels) == pytest.approx(retrieval_metrics(features, labels), abs=1e-4)


def test_retrieval_does_not_depend_on_block_size():
    features, labels = _random_split(6, n=37)
    expected = retrieval_metrics(features, labels, block_size=1024)
    for block_size in (1, 5, 36):
        assert retrieval_metrics(features, labels, block_size=block_size) == pytest.approx(expected, abs=1e-4)


def test_retrieval_errors_name_the_problem():
    with pytest.raises(MetricUnavailable, match="each of its 4 classes has one"):  # a ValueError
        retrieval_metrics(np.eye(4), np.arange(4))
    with pytest.raises(ValueError, match=r"must be \[N, D\]"):
        retrieval_metrics(np.zeros((2, 3, 4)), np.zeros(2, int))
    with pytest.raises(ValueError, match="labels must be \\[N\\] with N=4"):
        retrieval_metrics(np.eye(4), np.zeros(3, int))


# ----------------------------------------------------------------------------------------------------
# kNN.


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.5), (5, 0.01), (5, 0.001)])
def test_knn_matches_bruteforce_reference(k, temperature):
    train_features, train_labels = _random_split(7, n=60)
    test_features, test_labels = _random_split(8, n=25)
    got = knn_top1(
        train_features, train_labels, test_features, test_labels, k=k, temperature=temperature, block_size=8
    )
    want = reference_knn(train_features, train_labels, test_features, test_labels, k, temperature)
    assert got == pytest.approx(want)


@pytest.mark.parametrize("temperature", [0.07, 0.01, 0.001])
def test_knn_at_small_temperatures_matches_the_float64_reference(temperature):
    """exp(cos / T) overflows float32 once cos / T > 88 (T = 0.01 and cos > 0.89): the votes became inf and
    NaN and kNN silently scored 0%. Queries here are near-copies of train images, so cos is about 0.99."""
    train_features, train_labels = _random_split(11, n=60)
    rng = np.random.default_rng(12)
    test_features = train_features[:30] + rng.normal(scale=0.05, size=(30, 8)).astype(np.float32)
    test_labels = train_labels[:30]
    got = knn_top1(train_features, train_labels, test_features, test_labels, k=5, temperature=temperature)
    want = reference_knn(train_features, train_labels, test_features, test_labels, 5, temperature)
    assert want > 50 and got == pytest.approx(want)


def test_knn_separable_clusters_are_perfect_and_scale_free():
    rng = np.random.default_rng(9)
    centres = 10 * np.eye(6, dtype=np.float32)

    def blobs(n):
        labels = rng.integers(0, 6, size=n)
        features = centres[labels] + rng.normal(scale=0.5, size=(n, 6))
        return (features * rng.uniform(0.1, 100, size=(n, 1))).astype(np.float32), labels

    train, test = blobs(120), blobs(50)
    assert knn_top1(*train, *test, k=10) == 100.0
    assert knn_top1(*train, test[0], (test[1] + 1) % 6, k=10) == 0.0


def test_knn_errors_name_the_problem():
    features, labels = _random_split(10, n=10)
    with pytest.raises(MetricUnavailable, match="k=11 neighbours needs at least 11 train images"):
        knn_top1(features, labels, features, labels, k=11)
    with pytest.raises(ValueError, match="k=0 must be >= 1"):
        knn_top1(features, labels, features, labels, k=0)
    with pytest.raises(ValueError, match="differ in width"):
        knn_top1(features, labels, features[:, :4], labels, k=3)


# ----------------------------------------------------------------------------------------------------
# Linear probe. One shape everywhere: 200 train images, 16 dims, 4 classes.

N_TRAIN, DIM, NUM_CLASSES = 200, 16, 4


def _blobs(rng, n, margin):
    labels = np.arange(n) % NUM_CLASSES
    centres = margin * np.eye(NUM_CLASSES, DIM)
    return (centres[labels] + rng.normal(size=(n, DIM))).astype(np.float32), labels


def test_stratified_split_holds_out_each_class_proportionally():
    labels = np.repeat(np.arange(5), [10, 7, 3, 1, 20])
    fit, val = stratified_split(labels, 0.2, seed=0)
    assert np.intersect1d(fit, val).size == 0 and np.union1d(fit, val).size == labels.size
    for label, expected in zip(range(5), [2, 1, 1, 0, 4]):  # round(0.2 n_c), a singleton stays in fit
        assert np.sum(labels[val] == label) == expected
    assert np.array_equal(stratified_split(labels, 0.2, seed=0)[1], val)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=1)[1], val)


def test_lbfgs_fit_reaches_the_optimum_of_the_regularised_objective():
    rng = np.random.default_rng(11)
    features = rng.normal(size=(N_TRAIN, DIM)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=N_TRAIN).astype(np.int32)
    weight_decay = 1e-2
    params = _fit_softmax_regression(
        features, labels, np.ones(N_TRAIN, bool), jnp.float32(weight_decay), jnp.float32(1e-6),
        jnp.int32(500), num_classes=NUM_CLASSES,
    )
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    # Gradient of mean softmax CE + wd/2 ||w||^2 in numpy: it must vanish at the minimum.
    logits = features @ w + b
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    residual = (probabilities - np.eye(NUM_CLASSES)[labels]) / N_TRAIN
    grad_w, grad_b = features.T @ residual + weight_decay * w, residual.sum(axis=0)
    assert np.sqrt(np.sum(grad_w**2) + np.sum(grad_b**2)) < 1e-4
    assert np.abs(w).max() > 0.05  # not stuck at the zero initialisation


def test_linear_probe_separable_blobs_reach_100_percent():
    rng = np.random.default_rng(12)
    result = linear_probe(*_blobs(rng, N_TRAIN, margin=8.0), *_blobs(rng, 100, margin=8.0))
    assert result["top1"] == 100.0 and result["val_top1"] == 100.0


def test_linear_probe_random_labels_stay_near_chance():
    rng = np.random.default_rng(13)
    train_features = rng.normal(size=(N_TRAIN, DIM)).astype(np.float32)
    test_features = rng.normal(size=(400, DIM)).astype(np.float32)
    train_labels, test_labels = rng.integers(0, NUM_CLASSES, N_TRAIN), rng.integers(0, NUM_CLASSES, 400)
    result = linear_probe(train_features, train_labels, test_features, test_labels)
    assert abs(result["top1"] - 25.0) < 10.0  # chance is 25%; 400 test images give a std of ~2%


def test_linear_probe_choice_ignores_test_data_and_is_deterministic():
    rng = np.random.default_rng(14)
    # Overlapping blobs and a wide grid: unregularised fits overfit, so validation accuracy varies with wd.
    train = _blobs(rng, N_TRAIN, margin=2.0)
    test_features, test_labels = _blobs(rng, 100, margin=2.0)
    grid = (0.0, 1e-3, 1e-1, 1.0, 10.0)
    result = linear_probe(*train, test_features, test_labels, weight_decays=grid)
    assert set(result["val_curve"]) == set(grid)
    assert result["val_top1"] == max(result["val_curve"].values())
    assert result["val_top1"] == result["val_curve"][result["weight_decay"]]
    assert len(set(result["val_curve"].values())) > 1, "toy problem too easy to exercise the choice"

    garbage = rng.normal(size=test_features.shape).astype(np.float32)
    with_other_test = linear_probe(*train, garbage, rng.permutation(test_labels), weight_decays=grid)
    for key in ("val_curve", "val_top1", "weight_decay"):
        assert with_other_test[key] == result[key]
    assert with_other_test["top1"] != result["top1"]  # the test data did reach the final evaluation
    fits = []
    repeated = linear_probe(*train, test_features, test_labels, weight_decays=grid, after_fit=lambda: fits.append(1))
    assert repeated == result  # bit-for-bit, with a progress callback too
    assert len(fits) == len(grid) + 1  # one per weight decay and the refit


def test_linear_probe_errors_name_the_problem():
    rng = np.random.default_rng(15)
    train, test = _blobs(rng, N_TRAIN, 1.0), _blobs(rng, 10, 1.0)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        linear_probe(*train, *test, val_fraction=1.0)
    with pytest.raises(ValueError, match="num_classes=3 but a label is 3"):
        linear_probe(*train, *test, num_classes=3)


def hsic_cka_reference(x, y):
    """CKA from its definition with n x n Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = x.shape[0]
    centring = np.eye(n) - np.ones((n, n)) / n
    k, l = centring @ (x @ x.T) @ centring, centring @ (y @ y.T) @ centring
    return np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l))


def test_linear_cka_matches_the_gram_matrix_definition_and_its_invariances():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 12)), rng.normal(size=(40, 7))
    y[:, :3] += x[:, :3]  # partly shared
    np.testing.assert_allclose(linear_cka(x, y), hsic_cka_reference(x, y), rtol=1e-10)
    rotation, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    np.testing.assert_allclose(linear_cka(x, 3.0 * x @ rotation + 5.0), 1.0, rtol=1e-10)
    unrelated = linear_cka(rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8)))
    assert unrelated < 0.05
    with pytest.raises(ValueError, match="features of the same N images"):
        linear_cka(x, y[:30])
