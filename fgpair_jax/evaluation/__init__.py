"""Metrics on frozen pooled encoder features, all in percent; pure functions of (features, labels).

- `retrieval.retrieval_metrics`: leave-one-out cosine retrieval (rank-1, rank-5, mAP) on one split.
- `knn.knn_top1`: exp(cos/T)-weighted k-NN top-1, train split -> test split.
- `linear_probe.linear_probe`: logistic-regression top-1, weight decay chosen on a part of train.

Import them from their modules: re-exporting `linear_probe` here would shadow the module of the same
name. The encoder's passes over data live in `fgpair_jax.features`, metrics.json in `fgpair_jax.evaluate`.
"""

# The headline numbers of every evaluation (keys of eval/metrics.json, percent), with their short names
# for tables and figures; the one place they are defined.
HEADLINE_METRICS = {
    "linear_top1": "linear top-1",
    "retrieval_rank1": "R@1",
    "retrieval_rank5": "R@5",
    "retrieval_map": "mAP",
    "knn_top1": "kNN top-1",
}


class MetricUnavailable(ValueError):
    """A metric the evaluated data cannot define (e.g. retrieval when every class has one image): not a
    bug and not a reason to lose the other metrics. `evaluate.compute_metrics` records the metric as
    None with this one-line reason under "unavailable"; the `unavailable_reason` function beside each
    metric predicts it from the labels before training (`preflight.py`)."""
