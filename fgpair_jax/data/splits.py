"""Validation splits carved out of train: the one place that decides which train images are held out.

Two users. The linear probe picks its weight decay on a held-out part of the train features. And
`config.data.eval_split = "val"` makes a held-out part of the train split the *evaluation* split
(SSL training then never sees those images), so that the method's hyper-parameters can be tuned
without ever reading the test split; `"test"` (the default) is for final runs only.
"""
import dataclasses
from typing import Mapping, Sequence

import numpy as np

from fgpair_jax.errors import ConfigError

EVAL_SPLITS = ("test", "val")
# The validation images are drawn with this fixed seed, not the run's seed, so every arm and seed of
# a tuning experiment is scored on the same images.
VALIDATION_SEED = 0


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit_indices, val_indices) of `labels`: round(val_fraction * n_c) of each class to validation.

    At least one image per class stays in the fit part (a class of one image is never validated).
    Both index arrays are sorted; the draw depends only on `labels`, `val_fraction` and `seed`.
    """
    rng = np.random.default_rng(seed)
    val_parts = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        num_val = min(int(round(val_fraction * members.size)), members.size - 1)
        val_parts.append(rng.permutation(members)[:num_val])
    val_indices = np.sort(np.concatenate(val_parts)).astype(np.int64)
    fit_indices = np.setdiff1d(np.arange(labels.size), val_indices)
    return fit_indices, val_indices


class Subset(Sequence):
    """The records `indices` of a random-access source, itself a random-access source (grain reads it)."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, position: int):
        return self.source[int(self.indices[position])]


def labels_of(source) -> np.ndarray:
    """Every record's label, in order (decodes each record once: seconds for CUB's 6k train images)."""
    return np.array([int(source[i]["label"]) for i in range(len(source))], np.int64)


def check_eval_split(eval_split: str, val_fraction: float) -> None:
    if eval_split not in EVAL_SPLITS:
        raise ConfigError(f"config.data.eval_split={eval_split!r}; use 'test' (final runs) or 'val' (tuning: "
                         "a held-out part of train).")
    if eval_split == "val" and not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"config.data.val_fraction={val_fraction} must lie strictly between 0 and 1.")


def with_validation_as_eval(sources: Mapping, info, val_fraction: float):
    """(sources, info) where "train" is train minus a class-stratified `val_fraction` and "test" is that
    held-out part; the real test split is dropped, so nothing downstream can read it."""
    fit, val = stratified_split(labels_of(sources["train"]), val_fraction, VALIDATION_SEED)
    if val.size == 0:
        raise ConfigError(f"config.data.val_fraction={val_fraction} holds out no image (it rounds to 0 in every "
                         "class); raise it, e.g. to 0.1.")
    carved = {"train": Subset(sources["train"], fit), "test": Subset(sources["train"], val)}
    sizes = dict(info.split_sizes, train=int(fit.size), test=int(val.size))
    return carved, dataclasses.replace(info, split_sizes=sizes)
