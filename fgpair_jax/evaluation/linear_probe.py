"""Linear probe: multinomial logistic regression on frozen, L2-normalised pooled features.

Protocol (the test split never influences any choice):
1. L2-normalise every feature row (the same view of the features as retrieval and kNN).
2. Carve a class-stratified validation part (`val_fraction` of each class, at least one image of each
   class left for fitting, seeded) out of the TRAIN split.
3. For each weight decay of the grid, fit on the rest of the train split and score on that validation
   part. Standardisation (optional) uses the statistics of the images being fitted.
4. Keep the weight decay with the best validation accuracy (ties: the larger one, the simpler model).
5. Refit on the FULL train split with it and evaluate on the test split exactly once.

The fit is full-batch L-BFGS (optax) on mean softmax cross-entropy + (wd/2)*||W||^2 (bias not
decayed), starting from zeros, inside one jitted while-loop: convex, deterministic, no learning rate
to tune, and a few hundred small matmuls for CUB-sized problems, so a grid runs in seconds on CPU.
"""
import functools
from typing import Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fgpair_jax.data.splits import stratified_split
from fgpair_jax.evaluation import MetricUnavailable
from fgpair_jax.evaluation.retrieval import check_features_and_labels, check_train_test, l2_normalize

_HIGHEST = jax.lax.Precision.HIGHEST
# No 0: an unregularised fit on separable features has its optimum at infinity, so its result is
# wherever L-BFGS stops, and it can win a flat validation curve by chance and then lose on test
# (results/README.md, comparison table). Runs evaluated before this grid changed used (0.0,) + this
# grid; `eval.probe_weight_decays` reproduces them.
# Up to 10: with the grid ending at 0.1 the probe chose its largest value in most quick runs, so the
# choice was capped by the grid (`at_grid_edge` in the result says when a choice still is).
DEFAULT_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
GRID_BEFORE_ZERO_WAS_DROPPED = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _fit_softmax_regression(features, labels, in_fit, weight_decay, tolerance, max_steps, *, num_classes):
    """{"w": [D,C], "b": [C]} minimising mean cross-entropy + (weight_decay/2)*||w||^2 by L-BFGS.

    Only rows with `in_fit` count: the validation fit and the full refit then share one array shape and
    one compilation (the L-BFGS loop takes seconds to compile). Stops when the gradient norm falls below
    `tolerance` or after `max_steps` iterations.
    """
    fit_weights = in_fit.astype(jnp.float32) / jnp.sum(in_fit)

    def objective(params):
        logits = jnp.dot(features, params["w"], precision=_HIGHEST) + params["b"]
        cross_entropy = jnp.sum(fit_weights * optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        return cross_entropy + 0.5 * weight_decay * jnp.sum(params["w"] ** 2)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)
    params = {
        "w": jnp.zeros((features.shape[1], num_classes), jnp.float32),
        "b": jnp.zeros((num_classes,), jnp.float32),
    }

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(params, updates), state

    def keep_going(carry):
        _, state = carry
        iteration = optax.tree_utils.tree_get(state, "count")
        grad_norm = optax.tree_utils.tree_norm(optax.tree_utils.tree_get(state, "grad"))
        return (iteration == 0) | ((iteration < max_steps) & (grad_norm >= tolerance))

    params, _ = jax.lax.while_loop(keep_going, step, (params, solver.init(params)))
    return params


def _accuracy(params, features: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent of the linear classifier `params` (ties: lower class wins)."""
    logits = jnp.dot(features, params["w"], precision=_HIGHEST) + params["b"]
    return 100.0 * float(np.mean(np.asarray(jnp.argmax(logits, axis=1)) == labels))


def _fit_and_score(
    train_x, train_y, in_fit, eval_x, eval_y, weight_decay, *, standardize, num_classes, steps, tolerance
):
    """Accuracy (percent) on (eval_x, eval_y) of a probe fitted on the `in_fit` rows of the train split."""
    if standardize:
        mean = train_x[in_fit].mean(axis=0, keepdims=True)
        scale = 1.0 / np.maximum(train_x[in_fit].std(axis=0, keepdims=True), 1e-6)
        train_x, eval_x = (train_x - mean) * scale, (eval_x - mean) * scale
    params = _fit_softmax_regression(
        train_x, train_y, in_fit, jnp.float32(weight_decay), jnp.float32(tolerance), jnp.int32(steps),
        num_classes=num_classes,
    )
    return _accuracy(params, eval_x, eval_y)


def unavailable_reason(train_labels, val_fraction: float) -> Optional[str]:
    """Why the probe cannot choose its weight decay on these [N] train labels, or None: the validation
    part it holds out (`stratified_split`) is empty."""
    _, validation = stratified_split(np.asarray(train_labels), val_fraction, 0)  # its size does not depend on the seed
    if validation.size:
        return None
    return (f"the linear probe holds out no train image to choose its weight decay (eval.probe_val_fraction="
            f"{val_fraction} rounds to 0 in every class); raise config.eval.probe_val_fraction")


def linear_probe(
    train_features,
    train_labels,
    test_features,
    test_labels,
    *,
    num_classes: int | None = None,
    val_fraction: float = 0.2,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    steps: int = 500,
    tolerance: float = 1e-5,
    standardize: bool = True,
    seed: int = 0,
    after_fit: Optional[Callable[[], object]] = None,
) -> Dict:
    """Linear-probe top-1 (percent) with the weight decay chosen on a validation part of TRAIN only.

    Returns {"top1": test accuracy %, "val_top1": best validation accuracy %, "weight_decay": the
    chosen value, "at_grid_edge": whether it is the grid's smallest or largest value (a wider grid
    might then do better), "val_curve": {weight_decay: validation accuracy %}}. The test split is used once,
    after the choice, by the refit on the full train split; `seed` only draws the validation part.

    Args:
      train_features, test_features: [N, D] features, not necessarily normalised.
      train_labels, test_labels: [N] non-negative int class ids.
      num_classes: width of the classifier; defaults to 1 + the largest label of either split.
      val_fraction: share of each train class held out for choosing the weight decay.
      weight_decays: grid of L2 coefficients on W (objective: mean CE + wd/2 * ||W||^2). With wd=0 on
        separable data the optimum is at infinity, so that fit is in effect early-stopped by
        `steps`/`tolerance`.
      steps: maximum L-BFGS iterations per fit; tolerance: stop once ||gradient|| is below it.
      standardize: z-score each dimension with the fitted images' statistics after L2 normalisation.
      after_fit: called with no argument after each of the len(weight_decays) + 1 fits (e.g. a progress
        bar's `update`); it does not change the result.
    """
    train_x, train_y = check_features_and_labels(train_features, train_labels, "linear-probe train")
    test_x, test_y = check_features_and_labels(test_features, test_labels, "linear-probe test")
    num_classes = check_train_test(train_x, train_y, test_x, test_y, num_classes, "linear-probe")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"linear-probe val_fraction must be in (0, 1); got {val_fraction}.")
    if len(weight_decays) == 0 or min(weight_decays) < 0:
        raise ValueError(f"linear-probe weight_decays must be non-empty and >= 0; got {weight_decays}.")

    train_x, test_x = l2_normalize(train_x), l2_normalize(test_x)
    reason = unavailable_reason(train_y, val_fraction)
    if reason:
        raise MetricUnavailable(reason)
    fit_indices, val_indices = stratified_split(train_y, val_fraction, seed)
    in_fit = np.zeros(train_y.size, bool)
    in_fit[fit_indices] = True
    fit_options = dict(standardize=standardize, num_classes=num_classes, steps=steps, tolerance=tolerance)

    after_fit = after_fit or (lambda: None)
    val_x, val_y = train_x[val_indices], train_y[val_indices]
    val_curve = {}
    for wd in weight_decays:
        val_curve[float(wd)] = _fit_and_score(train_x, train_y, in_fit, val_x, val_y, wd, **fit_options)
        after_fit()
    # Best validation accuracy; among equals the larger weight decay (the more regularised model).
    chosen_wd = max(val_curve, key=lambda wd: (val_curve[wd], wd))
    all_train = np.ones(train_y.size, bool)
    test_top1 = _fit_and_score(train_x, train_y, all_train, test_x, test_y, chosen_wd, **fit_options)
    after_fit()
    return {
        "top1": test_top1,
        "val_top1": val_curve[chosen_wd],
        "weight_decay": chosen_wd,
        # 0 is no edge to widen: no weight decay is smaller.
        "at_grid_edge": len(val_curve) > 1 and chosen_wd in ({min(val_curve)} - {0.0}) | {max(val_curve)},
        "val_curve": val_curve,
    }
