"""Metrics on frozen pooled encoder features, all in percent; pure functions of (features, labels).

- `retrieval.retrieval_metrics`: leave-one-out cosine retrieval (rank-1, rank-5, mAP) on one split.
- `knn.knn_top1`: exp(cos/T)-weighted k-NN top-1, train split -> test split.
- `linear_probe.linear_probe`: logistic-regression top-1, weight decay chosen on a part of train.

Import them from their modules: re-exporting `linear_probe` here would shadow the module of the same
name. Feature extraction and metrics.json live in `fgpair_jax.evaluate`.
"""
