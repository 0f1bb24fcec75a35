"""One training step, method-agnostic: augment on device, loss + gradients, update, the non-finite guard.

`make_train_step` returns the jitted function; the caller places the state replicated and the batch
sharded over the mesh (`parallel.py`), and XLA partitions the step. The method (`config.method`)
supplies the loss and updates its own state (`Method.update_state`: a queue, a momentum encoder and its
schedule, a variance EMA); this module names none of them.
"""
import functools

import jax
import jax.numpy as jnp
import optax

from fgpair_jax import numerics, parallel
from fgpair_jax.data import augment
from fgpair_jax.methods import get_method
from fgpair_jax.models import input_normalization
from fgpair_jax.state import TrainState


def augment_views(rng: jax.Array, batch: dict, config):
    """MoCo v2 photometric augmentation of both host-cropped uint8 views, independently per view."""
    rng1, rng2 = jax.random.split(rng)
    mean, std = input_normalization(config.model)
    options = dict(config.augment, mean=mean, std=std)
    return (augment.mocov2_photometric(rng1, batch["view1"], **options),
            augment.mocov2_photometric(rng2, batch["view2"], **options))


def train_step(state: TrainState, batch: dict, *, config, tx: optax.GradientTransformation,
               steps_per_epoch: int):
    """state, batch{'view1','view2' uint8} -> (next state, metrics dict of scalars).

    A step whose loss or gradients are not finite changes nothing but `step` and `rng`
    (`numerics.guard_update`); its metrics say so (`finite` False) and the host decides what follows.
    """
    method = get_method(config.method)
    rng = jax.random.wrap_key_data(state.rng)
    rng, augment_rng, loss_rng = jax.random.split(rng, 3)
    view1, view2 = augment_views(augment_rng, batch, config)

    epoch = state.step.astype(jnp.float32) / steps_per_epoch
    grad_fn = jax.value_and_grad(functools.partial(method.loss, epoch=epoch), has_aux=True)
    (_, aux), grads = grad_fn(state.params, state, view1, view2, loss_rng, config)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    # model.keep_bn_stats: normalise with batch statistics as always, but leave the running ones
    # (what evaluation uses) at their start: augmented batches otherwise drag ImageNet's away.
    # Only the encoder's: a method's own modules (LCR's attention BN) train their statistics as usual.
    keep = config.model.keep_bn_stats
    batch_stats = dict(aux["batch_stats"], encoder=state.batch_stats["encoder"]) if keep else aux["batch_stats"]
    method_state = method.update_state(state.method_state, params, aux, config, step=state.step,
                                       total_steps=max(1, config.num_epochs * steps_per_epoch))
    next_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        rng=jax.random.key_data(rng),
        method_state=method_state,
    )
    grad_norm = optax.tree.norm(grads)
    finite = numerics.is_finite_step(aux["metrics"]["loss"], grad_norm)
    next_state = numerics.guard_update(finite, next_state, state)
    logged = is_logged_step(state.step + 1, config.log_every_steps, config.num_epochs * steps_per_epoch)
    shares = logged_gradient_shares(logged, grads, lambda: method.term_gradients(state.params, state, aux, config))
    metrics = dict(aux["metrics"], grad_norm=grad_norm, finite=finite, **shares)
    return next_state, metrics


def is_logged_step(step, log_every_steps: int, total_steps: int):
    """Whether the step numbered `step` (1-based, after its update; int or int32 array) has its metrics
    written: every `log_every_steps`-th and the last (`train.train_and_evaluate`'s rule)."""
    return (step % log_every_steps == 0) | (step == total_steps)


def logged_gradient_shares(logged, grads, term_gradients) -> dict:
    """`gradient_shares` of `term_gradients()` (a thunk: the method's `term_gradients`) computed only when
    `logged` (a bool scalar) under `lax.cond`, NaN otherwise (not measured: `train._mean_metrics` leaves
    NaN out); {} when the method reports no term. A diagnostic costs its extra backward pass on logged
    steps only."""
    def measure():
        return gradient_shares(grads, term_gradients())

    template = jax.eval_shape(measure)
    if not template:
        return {}
    return jax.lax.cond(logged, measure,
                        lambda: jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), template))


GRADIENT_SHARE_PREFIX = "grad_share_"  # computed on logged steps only, NaN on the others (logged_gradient_shares)


def gradient_shares(grads, term_gradients: dict) -> dict:
    """{'grad_share_<term>': ||g_term|| / ||g - g_term||} for each loss term in `term_gradients` (the
    method's `term_gradients`: a gradient restricted to some params subtrees, e.g. fgpair's nu * L_Cp on
    the encoder): how strongly that term pulls the weights against all the others."""
    shares = {}
    for name, term in term_gradients.items():
        total = {subtree: grads[subtree] for subtree in term}
        rest = jax.tree.map(jnp.subtract, total, term)
        shares[f"{GRADIENT_SHARE_PREFIX}{name}"] = optax.tree.norm(term) / jnp.maximum(optax.tree.norm(rest), 1e-12)
    return shares


def make_train_step(config, tx, mesh, steps_per_epoch: int):
    """The jitted step: state replicated in and out (donated), batch sharded over `data`."""
    replicated = parallel.replicated(mesh)
    return jax.jit(
        functools.partial(train_step, config=config, tx=tx, steps_per_epoch=steps_per_epoch),
        in_shardings=(replicated, parallel.batch_sharded(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
