"""Optimiser and learning-rate schedule: SGD + momentum + weight decay, linear warm-up then cosine decay."""
import optax


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


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD as MoCo v2: L2 weight decay added to the gradient (all parameters), then momentum SGD."""
    if config.optim.name != "sgd":
        raise ValueError(f"config.optim.name={config.optim.name!r} is not supported; use 'sgd'.")
    return optax.chain(
        optax.add_decayed_weights(config.optim.weight_decay),
        optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=config.optim.momentum),
    )
