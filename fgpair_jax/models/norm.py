"""Batch normalisation with statistics computed per group of the batch ("ghost" batch norm).

Why groups: MoCo's key encoder must not see the same batch statistics as the query encoder, or the
contrastive task can be solved by reading the statistics ("BN leakage"). MoCo's answer is shuffle-BN:
per-GPU statistics, with the keys' batch shuffled across GPUs. Under `jax.jit` on a global batch there
are no per-GPU statistics, so we make the grouping explicit: the batch is split into `num_groups`
contiguous groups, each normalised with its own statistics, and the key batch is permuted before the
key encoder (see `methods/moco.py`). Because the grouping is a config knob and not the device count,
the math is the same on 1 device or 256: a run is reproducible across mesh sizes. When `num_groups` is
a multiple of the number of data-parallel devices, each group lives on one device and XLA computes the
statistics without cross-device traffic.

Parameter and statistic names (`scale`, `bias`, `mean`, `var`) match `flax.linen.BatchNorm`, so
converted checkpoints and tools written for flax work unchanged.
"""
from typing import Any

import jax.numpy as jnp
from flax import linen as nn


class GroupedBatchNorm(nn.Module):
    """BatchNorm over the last axis with per-group batch statistics in training mode.

    Attributes:
      use_running_average: evaluate with the running statistics (inference / frozen encoder).
      num_groups: number of contiguous batch groups with separate statistics; 1 = plain BatchNorm.
      momentum: running-average decay (0.9 = PyTorch's momentum 0.1).
      epsilon: added to the variance.
      dtype: dtype of the output; statistics are always float32.
      scale_init: initialiser of the scale (zeros for "zero-init residual" if wanted).
    """

    use_running_average: bool = False
    num_groups: int = 1
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    scale_init: Any = nn.initializers.ones

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))

        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
            y = (x.astype(jnp.float32) - mean) * (scale * jnp.reciprocal(jnp.sqrt(var + self.epsilon)))
            return (y + bias).astype(self.dtype)

        batch = x.shape[0]
        if batch % self.num_groups:
            raise ValueError(
                f"GroupedBatchNorm: batch size {batch} is not divisible by num_groups={self.num_groups}; "
                "set config.model.bn_groups to a divisor of the per-step batch size."
            )
        grouped = x.astype(jnp.float32).reshape((self.num_groups, batch // self.num_groups) + x.shape[1:])
        reduce_axes = tuple(range(1, grouped.ndim - 1))
        mean = jnp.mean(grouped, axis=reduce_axes, keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axis=reduce_axes, keepdims=True)
        y = (grouped - mean) * (scale * jnp.reciprocal(jnp.sqrt(var + self.epsilon))) + bias
        if not self.is_initializing():
            group_mean = jnp.mean(mean.reshape(self.num_groups, features), axis=0)
            group_var = jnp.mean(var.reshape(self.num_groups, features), axis=0)
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * group_mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * group_var
        return y.reshape(x.shape).astype(self.dtype)
