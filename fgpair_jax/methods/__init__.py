"""Registry of self-supervised methods, chosen by `config.method`.

A method is a module exposing three pure functions:
  init_variables(rng, config) -> {'params': {...}, 'batch_stats': {...}}
  loss(params, state, view1, view2, rng, config, *, epoch) -> (scalar loss, aux) where aux holds
      'keys' (to enqueue), 'batch_stats', 'ema_batch_stats', 'metrics' (dict of scalars) and
      optionally 'extras' (the method's non-trained state); `epoch` is the fractional progress
  eval_features(params, batch_stats, images, config) -> [B, D] features of the frozen encoder
a tuple MOMENTUM_SUBTREES naming the params subtrees that have a momentum copy (key encoder), and
optionally init_extras(config) -> pytree of method state that is not trained.
"""
import types

from fgpair_jax.methods import fgpair, lcr, moco

METHODS = {"moco": moco, "lcr": lcr, "fgpair": fgpair}


def get_method(name: str) -> types.ModuleType:
    """The method module registered as `name`, or a one-line error listing the choices."""
    if name not in METHODS:
        raise ValueError(f"Unknown config.method={name!r}; choose one of {sorted(METHODS)}.")
    return METHODS[name]
