"""What a 2-D map of a run's test features costs (figures/embedding.py): PCA, the umap import, a first
UMAP fit (numba compiles) and a second one in the same process, wall and CPU seconds, as JSON.

    python benchmarks/embedding_cost.py --features=workdirs/table/moco_seed0/eval/features.npz \
        --out=results/bench/embedding_cost.json
"""
import json
import os
import time

import numpy as np
from absl import app, flags

from fgpair_jax.figures import embedding

_FEATURES = flags.DEFINE_string("features", "workdirs/table/moco_seed0/eval/features.npz", "A run's eval/features.npz.")
_OUT = flags.DEFINE_string("out", "results/bench/embedding_cost.json", "JSON result.")


def timed(function):
    """(result, wall seconds, CPU seconds of this process) of function()."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, round(time.perf_counter() - wall, 1), round(time.process_time() - cpu, 1)


def main(argv):
    del argv
    with np.load(_FEATURES.value) as saved:
        features = saved["test_features"]
    result = {"features": _FEATURES.value, "images": int(features.shape[0]), "dims": int(features.shape[1]),
              "load_average_1min_at_start": os.getloadavg()[0], "cpu_count": os.cpu_count()}
    _, result["pca_wall_s"], result["pca_cpu_s"] = timed(lambda: embedding.project_2d(features, method="pca"))
    umap, result["umap_import_wall_s"], result["umap_import_cpu_s"] = timed(embedding._umap)
    if umap is not None:
        for fit in ("first", "second"):
            _, result[f"umap_{fit}_fit_wall_s"], result[f"umap_{fit}_fit_cpu_s"] = timed(
                lambda: embedding.project_2d(features))
    result["load_average_1min_at_end"] = os.getloadavg()[0]
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    app.run(main)
