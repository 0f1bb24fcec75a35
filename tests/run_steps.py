"""Runs a few train steps of the tiny config on a fixed batch and saves the result (for test_train_step).

Run as a script in a fresh process so that XLA_FLAGS (fake CPU devices) takes effect before JAX
initialises: `python tests/run_steps.py OUT.npz NUM_STEPS`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from conftest import tiny_config  # noqa: E402
from fgpair_jax import optim, parallel, state as state_lib, step as step_lib  # noqa: E402


def fixed_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    shape = (config.global_batch_size, config.data.image_size, config.data.image_size, 3)
    return {"view1": rng.integers(0, 256, shape, dtype=np.uint8),
            "view2": rng.integers(0, 256, shape, dtype=np.uint8)}


def run(num_steps: int, method: str = "moco"):
    """(final state on host, list of metric dicts) after `num_steps` steps on fixed batches."""
    # The decoder's Adam moves each weight by ~lr * sign(g) on its first step, so a gradient that is
    # float noise around zero gets an lr-sized update whose sign depends on summation order. That is
    # Adam's conditioning, not the sharding under test: compare the decoder under SGD instead.
    # The queue of 16 the reference numbers (test_fgpair.SLICE_MOCO_LOSSES) were produced with; the tiny
    # config's own is 8 since the preflight check (a queue below the 18 train images minus a batch).
    method, _, base = method.partition("_")  # fgpair_simsiam: fgpair on the simsiam base
    config = tiny_config(method=method, **{"fgpair.decoder_optimizer": "sgd", "moco.queue_size": 16,
                                           "fgpair.base": base or "moco"})
    mesh = parallel.make_mesh()
    tx = optim.make_optimizer(config, steps_per_epoch=10)
    state = state_lib.create_train_state(config, jax.random.key(0), tx, state_lib.method_sizes(config, None))
    state = jax.device_put(state, parallel.replicated(mesh))
    train_step = step_lib.make_train_step(config, tx, mesh, steps_per_epoch=10)
    history = []
    for step in range(num_steps):
        state, metrics = train_step(state, parallel.global_batch(fixed_batch(config, step), mesh))
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return jax.device_get(state), history


if __name__ == "__main__":
    out_path, num_steps = sys.argv[1], int(sys.argv[2])
    method = sys.argv[3] if len(sys.argv) > 3 else "moco"
    final_state, history = run(num_steps, method)
    leaves = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(final_state)}
    np.savez(out_path, devices=jax.device_count(), losses=[h["loss"] for h in history], **leaves)
