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


def _batch_norm(train: bool, affine: bool = True, name: str = None):
    """BatchNorm1d over the whole (global) batch: under one `jax.jit` the batch axis spans every device, so
    this is PyTorch's SyncBatchNorm / haiku's cross-replica BN (statistics independent of the device count).
    momentum 0.9 = torch's 0.1, eps 1e-5; two-pass variance, as torch computes it."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, use_scale=affine,
                        use_bias=affine, use_fast_variance=False, name=name)


class SimSiamProjector(nn.Module):
    """SimSiam's 3-layer projection MLP (facebookresearch/simsiam `simsiam/builder.py`):
    Linear(D, hidden, no bias)-BN-ReLU, Linear(hidden, hidden, no bias)-BN-ReLU, Linear(hidden, out)-BN
    without affine. [B, D] float -> [B, out] float32. The last Linear's bias is dropped: builder.py freezes
    it and the affine-free BN after it subtracts it anyway."""

    hidden_dim: int
    out_dim: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        for i in (1, 2):
            x = nn.Dense(self.hidden_dim, use_bias=False, name=f"fc{i}")(x)
            x = nn.relu(_batch_norm(train, name=f"bn{i}")(x))
        x = nn.Dense(self.out_dim, use_bias=False, name="fc3")(x)
        return _batch_norm(train, affine=False, name="bn3")(x)


class BottleneckPredictor(nn.Module):
    """A 2-layer prediction MLP: Linear(in, hidden)-BN-ReLU-Linear(hidden, out). [B, in] -> [B, out].

    `hidden_bias`: SimSiam's first Linear has no bias (it is followed by BN; `builder.py`), BYOL's has one
    (haiku's Linear default; deepmind-research `byol/utils/networks.py` MLP). The same module is BYOL's
    projector (hidden 4096, out 256 at ResNet-50)."""

    hidden_dim: int
    out_dim: int
    hidden_bias: bool = False

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Dense(self.hidden_dim, use_bias=self.hidden_bias, name="fc1")(x)
        x = nn.relu(_batch_norm(train, name="bn1")(x))
        return nn.Dense(self.out_dim, name="fc2")(x)
