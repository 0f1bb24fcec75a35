"""Optimiser and learning-rate schedule: SGD + momentum + weight decay, linear warm-up then cosine decay."""
import functools

import jax
import optax

from fgpair_jax.methods import get_method
from fgpair_jax.models import frozen_modules


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """Warm-up from 0 over `optim.warmup_epochs`, then cosine to 0 at the end of `num_epochs`."""
    total_steps = max(1, config.num_epochs * steps_per_epoch)
    warmup_steps = min(int(config.optim.warmup_epochs * steps_per_epoch), total_steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.optim.learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=0.0,
    )


def parameter_labels(params, frozen: tuple, own_optimizers=(), separate_encoder: bool = False):
    """A label per parameter leaf: the top-level subtree's name when it has an optimiser of its own
    (`own_optimizers`, from the method), 'frozen' for encoder modules named in `frozen`, 'encoder' for
    the rest of the encoder when it has a learning rate of its own (`separate_encoder`), else 'trained'."""
    def label(path, _):
        keys = [getattr(entry, "key", None) for entry in path]
        if keys[0] in own_optimizers:
            return keys[0]
        if keys[0] == "encoder" and len(keys) > 1 and keys[1] in frozen:
            return "frozen"
        return "encoder" if separate_encoder and keys[0] == "encoder" else "trained"

    return jax.tree_util.tree_map_with_path(label, params)


def sgd(config, steps_per_epoch: int, scale: float = 1.0) -> optax.GradientTransformation:
    """MoCo v2's SGD: L2 weight decay added to the gradient, then momentum SGD on the schedule x scale."""
    schedule = learning_rate_schedule(config, steps_per_epoch)
    return optax.chain(
        optax.add_decayed_weights(config.optim.weight_decay),
        optax.sgd(schedule if scale == 1.0 else (lambda step: scale * schedule(step)),
                  momentum=config.optim.momentum),
    )


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD for the encoder and the heads; subtrees the method trains its own way (e.g. fgpair's decoder)
    get the method's optimiser (`Method.optimizer_partitions`).

    Frozen encoder modules (`model.frozen_stages`) get a zero update: without this, weight decay alone
    would still shrink weights that receive no gradient. `optim.encoder_lr_scale` != 1 gives the
    (pretrained) encoder a learning rate of its own, relative to the randomly initialised heads'. At 1
    the encoder and heads share one transform, so checkpoints written before the knob existed restore.
    """
    scale = config.optim.encoder_lr_scale
    own = get_method(config.method).optimizer_partitions(config)
    transforms = {"trained": sgd(config, steps_per_epoch), "frozen": optax.set_to_zero(), **own}
    if scale != 1.0:
        transforms["encoder"] = sgd(config, steps_per_epoch, scale)
    labels = functools.partial(parameter_labels, frozen=frozen_modules(config.model), own_optimizers=tuple(own),
                               separate_encoder=scale != 1.0)
    return optax.multi_transform(transforms, labels)
