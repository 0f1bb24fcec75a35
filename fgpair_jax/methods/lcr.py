"""LCR baseline (Shu et al., CVPR 2023, "Learning Common Rationale"): MoCo v2 plus an attention branch
on the last feature map, fitted to the Grad-CAM map of the SSL loss; its attention pools the features
used at evaluation.

L = L_C + lcr.weight * KL(q || p), q = the per-image Grad-CAM map of L_C (`gradcam.py`) as a spatial
distribution (a constant target), p = softmax over positions of a 1x1 convolution of the feature map.
The KL gradient reaches the encoder too (unless `lcr.detach_features`), which is how the encoder learns
the "common rationale" of the data.
"""
import jax
import jax.numpy as jnp
from flax import linen as nn

from fgpair_jax import gradcam
from fgpair_jax.errors import ConfigError
from fgpair_jax.methods import moco
from fgpair_jax.models import feature_dim

MOMENTUM_SUBTREES = moco.MOMENTUM_SUBTREES
ABLATIONS = {}
init_extras = moco.init_extras
optimizer_partitions = moco.optimizer_partitions  # the attention branch follows the run's SGD
figure_arrays = moco.figure_arrays


class AttentionBranch(nn.Module):
    """1x1 conv D -> 1: a logit per position of the feature map."""

    @nn.compact
    def __call__(self, feature_map):
        return nn.Conv(1, (1, 1), name="conv")(feature_map)[..., 0]


def init_variables(rng: jax.Array, config) -> dict:
    moco_rng, branch_rng = jax.random.split(rng)
    variables = moco.init_variables(moco_rng, config)
    sample = jnp.zeros((1, 2, 2, feature_dim(config.model)))
    variables["params"]["attention"] = AttentionBranch().init(branch_rng, sample)["params"]
    return variables


def attention(params, feature_map) -> jax.Array:
    """p: [B, h, w] spatial attention (sums to 1 per image)."""
    logits = AttentionBranch().apply({"params": params["attention"]}, feature_map)
    flat = jax.nn.softmax(logits.reshape(logits.shape[0], -1), axis=1)
    return flat.reshape(logits.shape)


def kl_divergence(target: jax.Array, predicted: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Mean over the batch of KL(target || predicted) between [B, h, w] spatial distributions."""
    t = target.reshape(target.shape[0], -1)
    p = predicted.reshape(predicted.shape[0], -1)
    return jnp.mean(jnp.sum(t * (jnp.log(t + eps) - jnp.log(p + eps)), axis=1))


def loss(params, state, view1, view2, rng, config, *, epoch):
    del epoch
    loss_c, aux = moco.contrastive_loss(params, state, view1, view2, rng, config)
    feature_map = aux["query"].feature_map
    loss_of_map = moco.contrastive_loss_of_feature_map(params, aux["keys"], state.queue, config)
    gradient = gradcam.loss_gradient_wrt_feature_map(loss_of_map, feature_map)
    target = gradcam.normalize_map(gradcam.gradcam_maps(jax.lax.stop_gradient(feature_map), gradient))
    branch_input = jax.lax.stop_gradient(feature_map) if config.lcr.detach_features else feature_map
    loss_kl = kl_divergence(target, attention(params, branch_input))
    total = loss_c + config.lcr.weight * loss_kl
    aux["metrics"].update({"loss": total, "loss_attention_kl": loss_kl})
    return total, aux


def eval_features(params, batch_stats, images, config) -> jax.Array:
    """Attention-pooled features: sum over positions of p * A (LCR's evaluation features)."""
    (feature_map, _), _ = moco.encode(params, batch_stats, images, config, train=False)
    weights = attention(params, feature_map)
    return jnp.einsum("bhw,bhwd->bd", weights, feature_map)


def validate(config) -> None:
    moco.validate(config)
    if config.lcr.weight < 0:
        raise ConfigError(f"config.lcr.weight={config.lcr.weight} must be >= 0 (LCR: 0.01).")
