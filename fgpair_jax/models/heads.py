"""Projection heads on the pooled feature vector."""
from flax import linen as nn


class ProjectionMLP(nn.Module):
    """MoCo v2's head: Linear(D, hidden) -> ReLU -> Linear(hidden, out). No batch norm, as in MoCo v2."""

    hidden_dim: int
    out_dim: int = 128

    @nn.compact
    def __call__(self, pooled):
        x = nn.relu(nn.Dense(self.hidden_dim, name="fc1")(pooled))
        return nn.Dense(self.out_dim, name="fc2")(x)
