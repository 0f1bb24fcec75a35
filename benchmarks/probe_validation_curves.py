"""How stable is the linear probe's weight-decay choice? Its validation curves, from train features only.

The probe (`evaluation/linear_probe.py`) picks its weight decay on a class-stratified 20% of the train
split, seeded by the run's seed, then refits on all of train and reads test once. This script redoes
only the first part for finished runs, from the train features their evaluation cached in
`eval/features.npz`: it never loads test features, so it can be run after a table without touching
the test split again.

    python benchmarks/probe_validation_curves.py --root=workdirs/table \
        --runs=random_seed2,variance_seed2,moco_seed0,moco_seed2 \
        --out=results/table_quick_cpu/probe_validation_curves.json
"""
import json
import os

import numpy as np
from absl import app, flags

from fgpair_jax import run_config
from fgpair_jax.atomic_files import write_atomically
from fgpair_jax.evaluation import linear_probe

_ROOT = flags.DEFINE_string("root", "workdirs/table", "Parent of the runs' workdirs.")
_RUNS = flags.DEFINE_list("runs", ["moco_seed0"], "Run names (<arm>_seed<N>) under --root.")
_OUT = flags.DEFINE_string("out", "results/probe_validation_curves.json", "JSON result.")


def validation_curve(train_features: np.ndarray, train_labels: np.ndarray, config) -> dict:
    """{"weight_decay": chosen, "val_curve": {wd: validation accuracy %}} on the run's own split and grid.

    `linear_probe` also refits and scores a 'test' set; it is handed a few train rows instead, and
    that score is dropped: nothing here reads the test split.
    """
    result = linear_probe.linear_probe(
        train_features, train_labels, train_features[:8], train_labels[:8], seed=config.seed,
        val_fraction=config.eval.probe_val_fraction, weight_decays=tuple(config.eval.probe_weight_decays))
    return {"weight_decay": result["weight_decay"], "val_curve": result["val_curve"]}


def main(argv):
    del argv
    curves = {}
    for run in _RUNS.value:
        workdir = os.path.join(_ROOT.value, run)
        config = run_config.load(workdir)  # the grid and seed the run was evaluated with
        with np.load(os.path.join(workdir, "eval", "features.npz")) as cached:
            curves[run] = validation_curve(cached["train_features"], cached["train_labels"], config)
        print(run, curves[run], flush=True)

    def write(path):
        with open(path, "w") as f:
            json.dump(curves, f, indent=2)

    write_atomically(_OUT.value, write)


if __name__ == "__main__":
    app.run(main)
