"""Non-finite losses and gradients: never apply them, then stop the run (default) or skip the step.

Inside the jitted step, `guard_update` keeps every trained quantity of the previous state when the
loss or the gradient norm is NaN/Inf (only the step counter and the rng advance, so the data position
stays `step`). On the host, `NonfiniteMonitor` reads each step's `finite` flag one step late — the
check then never stalls the device queue — and, with `config.on_nonfinite = "stop"`, raises a
one-line error naming the step and the loss terms before anything after it is saved. Because the
guarded state never contains the bad update, no checkpoint can hold it either way.
"""
import jax
import jax.numpy as jnp
from absl import logging

from fgpair_jax.errors import ConfigError, UserError

POLICIES = ("stop", "skip")


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ConfigError(f"config.on_nonfinite={policy!r}: use one of {POLICIES}.")


def is_finite_step(loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
    """True when the loss and every gradient are finite (a NaN/Inf gradient makes the norm NaN/Inf)."""
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm)


def guard_update(finite: jax.Array, updated, previous, always_advance=("step", "rng")):
    """`updated` when `finite`, else `previous` except for the `always_advance` fields (dataclass states)."""
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, previous)
    return kept.replace(**{name: getattr(updated, name) for name in always_advance})


class NonfiniteStepError(UserError, FloatingPointError):
    """The run met a NaN/Inf loss or gradient under `on_nonfinite='stop'`."""


def describe(step: int, metrics: dict) -> str:
    terms = ", ".join(f"{name} {float(value):.4g}" for name, value in sorted(metrics.items())
                      if name.startswith("loss") or name == "grad_norm")
    return f"step {step} ({terms})"


class NonfiniteMonitor:
    """Host side of the guard: `observe` each step's metrics, `flush` before saving or finishing."""

    def __init__(self, policy: str, checkpoint_hint: str):
        check_policy(policy)
        self.policy, self.checkpoint_hint = policy, checkpoint_hint
        self.pending = None
        self.skipped_steps = []

    def observe(self, step: int, metrics: dict) -> None:
        """Check the previous step (its result is ready by now) and hold this one."""
        self.flush()
        self.pending = (step, metrics)

    def flush(self) -> None:
        """Check the held step now; raise under 'stop', record and warn under 'skip'."""
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        if bool(jax.device_get(metrics["finite"])):
            return
        values = jax.device_get(metrics)
        if self.policy == "skip":
            self.skipped_steps.append(step)
            logging.warning("Skipped %s: non-finite, update not applied.", describe(step, values))
            return
        raise NonfiniteStepError(
            f"Non-finite loss or gradient at {describe(step, values)}; the run stopped and did not save "
            f"this state ({self.checkpoint_hint}). Lower config.optim.learning_rate, or set "
            "config.on_nonfinite=skip to skip such steps."
        )
