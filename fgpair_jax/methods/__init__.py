"""Registry of self-supervised methods, chosen by `config.method`.

A method is a module exposing three pure functions:
  init_variables(rng, config) -> {'params': {...}, 'batch_stats': {...}}
  loss(params, state, view1, view2, rng, config) -> (scalar loss, aux) where aux holds 'keys' (to
      enqueue), 'batch_stats', 'ema_batch_stats' and 'metrics' (dict of scalars)
  eval_features(params, batch_stats, images, config) -> [B, D] features of the frozen encoder
and a tuple MOMENTUM_SUBTREES naming the params subtrees that have a momentum copy (key encoder).
"""
import types

from fgpair_jax.methods import moco

METHODS = {"moco": moco}


def get_method(name: str) -> types.ModuleType:
    """The method module registered as `name`, or a one-line error listing the choices."""
    if name not in METHODS:
        raise ValueError(f"Unknown config.method={name!r}; choose one of {sorted(METHODS)}.")
    return METHODS[name]
