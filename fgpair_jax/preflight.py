"""Checks that need the built data set (its sizes, classes and splits), run before step 1.

`run_config.validate` checks what the config alone decides, before any data is built. What also depends
on the data — a batch larger than the training set, a queue that the data set cannot fill without the
query's own images, a metric that the evaluated split cannot define — is checked here, once the data is
built and before any state is created or any step is taken:

- a mistake is a `ConfigError` (one line naming the key and a value that works; the CLI exits 2), not a
  traceback during training or after it;
- something that will run but give an unavailable or silently wrong result is a one-line warning at the
  start, not a surprise at the end.
"""
import dataclasses
from typing import List

import numpy as np

from fgpair_jax import state as state_lib
from fgpair_jax.data import pipeline, splits
from fgpair_jax.errors import ConfigError
from fgpair_jax.evaluation import knn, linear_probe, retrieval
from fgpair_jax.features import eval_batch_size
from fgpair_jax.methods import get_method
from fgpair_jax.metrics_writer import announce
from fgpair_jax.models import feature_map_shape


@dataclasses.dataclass(frozen=True)
class DataFacts:
    """What the checks read of the data: the labels of the split SSL trains on and of the evaluated one."""

    train_labels: np.ndarray  # [N_train] int
    eval_labels: np.ndarray  # [N_eval] int: the test split, or the held-out val part (data.eval_split)

    @property
    def num_train(self) -> int:
        return int(self.train_labels.size)

    @classmethod
    def of_sources(cls, sources) -> "DataFacts":
        """Labels of `sources` "train" and "test" (reads each record once: seconds for CUB)."""
        return cls(splits.labels_of(sources["train"]), splits.labels_of(sources["test"]))


def check_errors(config, facts: DataFacts) -> None:
    """Raise `ConfigError` for the first config value that the data makes impossible to run."""
    batch, count = config.global_batch_size, facts.num_train
    pipeline.steps_per_epoch(count, batch)  # a batch larger than the train split
    state_lib.method_sizes(config, count)  # e.g. an empty automatic MoCo queue, or one of partial batches
    if config.eval.recompute_bn_stats and count < eval_batch_size(config):
        raise ConfigError(f"config.eval.recompute_bn_stats needs at least one evaluation batch of train images "
                          f"({eval_batch_size(config)}), the train split has {count}; lower "
                          f"config.eval.batch_size to at most {count} or switch it off.")
    reason = knn.unavailable_reason(count, config.eval.knn_k)
    if reason:
        raise ConfigError(f"config.eval.knn_k={config.eval.knn_k}: {reason}; lower it to at most {count}.")


def data_warnings(config, facts: DataFacts) -> List[str]:
    """One-line warnings for results the data will make unavailable or silently wrong."""
    warnings = []
    count = facts.num_train
    warnings += get_method(config.method).data_warnings(config, count)  # e.g. a MoCo queue as large as the data
    split = "held-out val part" if config.data.eval_split == "val" else "test split"
    reason = retrieval.unavailable_reason(facts.eval_labels)
    if reason:
        fix = "raise config.data.val_fraction" if config.data.eval_split == "val" else "evaluate on more images"
        warnings.append(f"retrieval will be reported unavailable: {reason} (the {split}); {fix}")
    reason = linear_probe.unavailable_reason(facts.train_labels, config.eval.probe_val_fraction)
    if reason:
        warnings.append(f"the linear probe will be reported unavailable: {reason}")
    return warnings


def model_warnings(config) -> List[str]:
    """The method's warnings that need the encoder's last feature map at the run's image size."""
    shape = feature_map_shape(config.model, config.data.image_size)
    return list(get_method(config.method).preflight_warnings(config, shape))


def check(config, sources) -> List[str]:
    """Every check of this module for a run on `sources`: raises `ConfigError` on a mistake, announces
    each warning as one line ("Warning: ...") and returns them."""
    facts = DataFacts.of_sources(sources)
    check_errors(config, facts)
    warnings = data_warnings(config, facts) + model_warnings(config)
    for warning in warnings:
        announce(f"Warning: {warning}.")
    return warnings
