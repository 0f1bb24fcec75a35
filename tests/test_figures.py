"""The figures (`fgpair_jax/figures/`), from small synthetic arrays, without training: each writes a PNG;
the retrieval figure's neighbours and their correctness are the retrieval metric's; the table plot draws
no CI bar for one seed; the loss figure's phases come from the config's schedule."""
import json
import math

import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer

from conftest import tiny_config
from fgpair_jax.figures import embedding, gradcam, losses, pairs, retrieval, table
from fgpair_jax.methods import COMPARED_ARMS, fgpair, get_method

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG


def slow_neighbours(features, labels, query, k):
    """Reference: float64 cosine similarity to every other image, sorted by (-similarity, index)."""
    unit = [np.asarray(f, np.float64) / np.linalg.norm(f) for f in features]
    others = [(-float(unit[query] @ unit[j]), j) for j in range(len(features)) if j != query]
    order = [j for _, j in sorted(others)[:k]]
    return order, [labels[j] == labels[query] for j in order]


def test_retrieval_neighbours_and_their_correctness_match_a_slow_reference():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 5)
    features = (rng.normal(size=(6, 8))[labels] + 0.7 * rng.normal(size=(30, 8))).astype(np.float32)
    features[7], features[8] = features[3] * 2.0, features[3] * 4.0  # one direction: ties, the lower index first
    queries = retrieval.choose_queries(labels, 4)
    neighbours, similarities, correct = retrieval.nearest_neighbours(features, labels, queries, k=5)
    assert neighbours.shape == similarities.shape == correct.shape == (4, 5)
    for row, query in enumerate(queries):
        order, hits = slow_neighbours(features, labels, query, 5)
        assert neighbours[row].tolist() == order
        assert correct[row].tolist() == hits
        assert np.all(np.diff(similarities[row]) <= 0)
    tied, _, correct = retrieval.nearest_neighbours(features, labels, [3, 8], k=2)
    assert tied.tolist() == [[7, 8], [3, 7]] and correct.tolist() == [[False, False], [False, True]]


def test_queries_are_deterministic_spread_and_have_a_positive():
    labels = np.array([0, 1, 1, 2, 3, 3, 3, 4, 5, 5])  # classes 0, 2 and 4 have one image: no positive
    chosen = retrieval.choose_queries(labels, 3)
    assert chosen.tolist() == retrieval.choose_queries(labels, 3).tolist() == [1, 5, 9]
    assert retrieval.choose_queries(labels, 50).tolist() == [1, 2, 4, 5, 6, 8, 9]  # all candidates, once
    assert retrieval.choose_queries(np.arange(5), 3).size == 0


@pytest.mark.parametrize("method,base", [("moco", ""), ("lcr", ""), ("simsiam", ""), ("byol", ""),
                                         ("fgpair", "moco"), ("fgpair", "simsiam"), ("fgpair", "byol")])
def test_every_method_gives_its_figure_arrays(method, base):
    """`Method.figure_arrays` of a fresh tiny state: a Grad-CAM map per image in [0, 1], and fgpair's pair
    on every base. (A figure that fails is only a warning at the end of a run, so this is where it shows.)"""
    import jax
    from fgpair_jax import optim, state as state_lib

    config = tiny_config(method=method, **({"fgpair.base": base} if base else {}))
    tx = optim.make_optimizer(config, steps_per_epoch=10)
    state = state_lib.create_train_state(config, jax.random.key(0), tx, state_lib.method_sizes(config, 18))
    images = jax.random.normal(jax.random.key(1), (4, config.data.image_size, config.data.image_size, 3))
    arrays = get_method(method).figure_arrays(state, images, jax.random.key(2), config)
    cam = np.asarray(arrays["cam"])
    assert cam.shape == images.shape[:3] and np.all(np.isfinite(cam)) and cam.min() >= 0 and cam.max() <= 1 + 1e-6
    if method == "fgpair":
        assert np.asarray(arrays["pair_a"]).shape == np.asarray(arrays["pair_b"]).shape == images.shape
        assert set(arrays["diagnostics"]) == {"pair_contrast", "pair_feature_distance"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in arrays["diagnostics"].values())


def test_every_figure_writes_a_png_from_small_arrays(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    gradcam.save_gradcam_overlays(images, rng.random((4, 16, 16)), str(tmp_path / "gradcam.png"), step=7, run="moco")
    config = tiny_config(method="fgpair")
    pairs.save_pair_grid(images, images, images[::-1], str(tmp_path / "pairs.png"), step=7,
                         title=fgpair.variant_text(config), row_notes=["contrast 0.1"] * 4)
    labels = np.repeat(np.arange(3), 4)
    features = rng.normal(size=(12, 5)).astype(np.float32)
    neighbours, similarities, correct = retrieval.nearest_neighbours(features, labels, [0, 5], k=3)
    big = rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    retrieval.save_retrieval_grid(big[[0, 5]], big[neighbours], labels[[0, 5]], labels[neighbours], similarities,
                                  correct, str(tmp_path / "retrieval.png"), run="moco", step=7)
    how = embedding.save_run_embedding(features, labels, str(tmp_path / "embedding.png"), run="moco", step=7)
    assert how.startswith("PCA")  # 12 images: too few for UMAP, and the title says so
    records = [{"step": s, "loss": 1.0 + (s > 4), "loss_pair": 2.0, "pair_weight": min(max(s - 4, 0) / 2, 1.0)}
               for s in range(1, 9)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert losses.save_loss_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path / "loss_curves.png"),
                                   get_method(config.method).loss_schedule(config), 8)
    for name in ("gradcam", "pairs", "retrieval", "embedding", "loss_curves"):
        assert is_png(tmp_path / f"{name}.png"), name


def test_the_loss_figure_takes_its_phases_and_formula_from_the_methods_schedule():
    config = tiny_config(method="fgpair", **{"fgpair.warmup_epochs": 1.0, "fgpair.ramp_epochs": 0.5})
    schedule = get_method("fgpair").loss_schedule(config)
    assert losses.schedule_phases(schedule, 46) == (47.0, 70.0)  # step s runs with epoch (s - 1) / 46's weight
    assert losses.schedule_phases(schedule, None) is None
    moco_schedule = get_method("moco").loss_schedule(tiny_config(method="moco"))
    assert losses.schedule_phases(moco_schedule, 46) is None
    assert schedule["formula"].startswith("L = L_C + α·L_R + ν_t·L_Cp with α = 1,") and "epoch 1.5" in schedule["formula"]
    assert moco_schedule["formula"] == "L = L_C, MoCo's InfoNCE"
    steps, weight = losses._weight_curve(schedule, 46, 80)  # the dashed curve is fgpair.pair_weight itself
    assert weight[46] == 0.0 and weight[69] == 1.0 and 0.0 < weight[57] < 1.0  # step s: epoch (s - 1) / 46
    no_nu = get_method("fgpair").loss_schedule(tiny_config(method="fgpair", **{"fgpair.nu": 0.0}))
    assert losses.schedule_phases(no_nu, 46) is None


def test_the_2d_map_falls_back_to_pca_and_says_so(monkeypatch):
    monkeypatch.setattr(embedding, "_umap", lambda: None)
    rng = np.random.default_rng(1)
    features = rng.normal(size=(embedding.UMAP_MIN_POINTS + 20, 6)) * np.array([5.0, 3.0, 1, 1, 1, 1])
    coordinates, how = embedding.project_2d(features)
    assert coordinates.shape == (features.shape[0], 2) and "install" in how and "UMAP" in how
    assert coordinates[:, 0].var() >= coordinates[:, 1].var()  # the first principal axis comes first
    np.testing.assert_allclose(embedding.project_2d(features)[0], coordinates)  # deterministic, signs too
    for shape in ((30, 6), (5, 9)):  # N > D (X^T X) and N < D (the Gram matrix)
        x = rng.normal(size=shape) * np.linspace(3, 1, shape[1])
        centred = x - x.mean(axis=0)
        reference = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T
        got = embedding.principal_components(x, 2)
        np.testing.assert_allclose(np.abs(got), np.abs(reference), atol=1e-9)  # the same up to each axis' sign
    assert embedding.principal_components(np.ones((1, 4)), 2).shape == (1, 2)
    assert embedding.coloured_classes(np.arange(100)).tolist()[:3] == [0, 5, 10]
    assert embedding.coloured_classes(np.arange(100)).size == embedding.MAX_COLOURED_CLASSES


def test_the_side_by_side_map_compares_moco_and_fgpair_of_a_common_seed(tmp_path):
    rng = np.random.default_rng(2)
    runs = {}
    for arm, seed in (("moco", 0), ("moco", 1), ("fgpair", 1), ("lcr", 0)):
        path = tmp_path / f"{arm}_seed{seed}.npz"
        np.savez(path, test_features=rng.normal(size=(20, 4)), test_labels=np.repeat(np.arange(5), 4))
        runs[(arm, seed)] = str(path)
    assert embedding.compared_runs(runs, COMPARED_ARMS) == (("moco", 1), ("fgpair", 1))
    written = embedding.write_side_by_side(str(tmp_path), runs, COMPARED_ARMS)
    assert written.endswith("embedding_moco_vs_fgpair_seed1.png") and is_png(written)
    assert embedding.write_side_by_side(str(tmp_path), {("moco", 0): runs[("moco", 0)]}, COMPARED_ARMS) is None


def test_one_seed_draws_no_ci_bar():
    assert table.error_bar(float("nan")) is None and table.error_bar(None) is None
    assert table.error_bar(1.25) == 1.25
    assert table.bar_label(68.5, float("nan"), 1) == "68.50\n(n=1, no CI)"
    assert table.bar_label(float("nan"), float("nan"), 2) == "n/a"
    def entry(seeds, top1, rank1):
        return {"seeds": seeds, "metrics": {"linear_top1": top1, "retrieval_rank1": rank1}}

    one_seed = {"moco": entry([0], (76.0, math.nan), (60.0, math.nan)),
                "init": entry([0], (80.0, math.nan), (68.0, math.nan))}
    figure = table.table_figure(one_seed, "moco", "cub")
    assert not [c for ax in figure.axes for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert all(ax.get_ylim()[0] == 0 for ax in figure.axes)
    three_seeds = dict(one_seed, fgpair=entry([0, 1, 2], (75.0, 1.0), (61.0, 2.0)))
    bars = [c for ax in table.table_figure(three_seeds, "moco").axes for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2  # one per panel: fgpair's, the only arm with an interval
