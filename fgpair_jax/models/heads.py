"""What sits on top of an encoder trunk: pooling (+ ImageNet classifier) and the projection head."""
import jax.numpy as jnp
from flax import linen as nn


def trunk_outputs(feature_map, num_classes: int):
    """(feature_map f32, mean-pooled [B, D]) — plus logits of a Dense `fc` if num_classes > 0.

    Call inside an encoder's compact `__call__`: the classifier becomes that encoder's `fc` module (kept
    only to check imported ImageNet weights).
    """
    feature_map = feature_map.astype(jnp.float32)
    pooled = jnp.mean(feature_map, axis=(1, 2))
    if num_classes:
        return feature_map, pooled, nn.Dense(num_classes, name="fc")(pooled)
    return feature_map, pooled


class LinearProjection(nn.Module):
    """MoCo v1's head: Linear(D, out), the encoder's `fc` with `num_classes=dim` (He et al. 2020)."""

    out_dim: int = 128

    @nn.compact
    def __call__(self, pooled):
        return nn.Dense(self.out_dim, name="fc")(pooled)


class ProjectionMLP(nn.Module):
    """MoCo v2's head: Linear(D, hidden) -> ReLU -> Linear(hidden, out). No batch norm, as in MoCo v2."""

    hidden_dim: int
    out_dim: int = 128

    @nn.compact
    def __call__(self, pooled):
        x = nn.relu(nn.Dense(self.hidden_dim, name="fc1")(pooled))
        return nn.Dense(self.out_dim, name="fc2")(x)
