"""MoCo v2 (Chen et al. 2020): InfoNCE between a query encoder and its momentum copy, negatives from a queue.

The pieces other methods reuse are public here: `init_variables` (encoder + projection head),
`embed` (one encoder pass -> feature map, pooled vector, normalised projection) and `momentum_keys`
(the key pass with shuffle-BN). A method is a module implementing `methods.Method`; the members this
module defines for MoCo are the defaults the other methods re-export where they agree.

Shuffle-BN under jit: the encoder normalises each of `config.model.bn_groups` contiguous slices of the
batch with its own statistics (`models/norm.py`), and the key batch is randomly permuted before the
momentum encoder and un-permuted after. A query and its key therefore never share batch statistics,
which is what MoCo's per-GPU shuffle achieves, but independent of how many devices run the step.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fgpair_jax import contrastive, gradcam
from fgpair_jax.errors import ConfigError
from fgpair_jax.models import build_encoder, feature_dim
from fgpair_jax.models.heads import LinearProjection, ProjectionMLP

# Subtrees of `params` that have a momentum (EMA) copy used as the key encoder.
MOMENTUM_SUBTREES = ("encoder", "head")
HEADS = ("mlp", "linear")
# Method branches a checkpoint of another project may hold beside the encoder: none (MoCo's own projection
# head is not imported: its linear evaluation drops it, main_lincls.py).
CHECKPOINT_BRANCHES = {}
# MoCo v2 is the baseline; `mocov1` is MoCo v1 (He et al. 2020; facebookresearch/moco main_moco.py without
# --mlp --moco-t 0.2 --aug-plus): a linear head, tau 0.07, and v1's augmentation (ColorJitter(0.4, 0.4, 0.4,
# 0.4) always applied, grayscale 0.2, no blur). The schedule stays the run's (v2 adds --cos): the arm
# isolates head, temperature and augmentation, the changes behind v1 -> v2's +6.7 linear on ImageNet.
# `moco_oracle`: MoCo v2 with the nuisance resampled per view (data/nuisance.py), for a base config that
# switches the nuisance on (`--config.nuisance.kind=panel`): what removing the shortcut by hand recovers.
ABLATIONS = {"mocov1": {"moco.head": "linear", "moco.temperature": 0.07, "augment.jitter_prob": 1.0,
                        "augment.hue": 0.4, "augment.blur_prob": 0.0},
             "moco_oracle": {"nuisance.views": "resampled"}}


class Embedding(NamedTuple):
    feature_map: jax.Array  # [B, h, w, D] last feature map of the encoder
    pooled: jax.Array  # [B, D] spatial mean of the feature map
    projection: jax.Array  # [B, d] L2-normalised output of the projection head


def projection_head(config):
    """The projection head `config.moco.head` names: 'mlp' (MoCo v2) or 'linear' (MoCo v1)."""
    if config.moco.head == "linear":
        return LinearProjection(out_dim=config.moco.dim)
    return ProjectionMLP(hidden_dim=config.moco.hidden_dim or feature_dim(config.model), out_dim=config.moco.dim)


def init_variables(rng: jax.Array, config) -> dict:
    """Fresh {'params': {'encoder', 'head'}, 'batch_stats': {'encoder'}} for `config`."""
    encoder_rng, head_rng = jax.random.split(rng)
    size = config.data.image_size
    encoder_vars = build_encoder(config.model).init(encoder_rng, jnp.zeros((1, size, size, 3)), train=False)
    head_vars = projection_head(config).init(head_rng, jnp.zeros((1, feature_dim(config.model))))
    return {
        "params": {"encoder": encoder_vars["params"], "head": head_vars["params"]},
        "batch_stats": {"encoder": encoder_vars["batch_stats"]},
    }


def encode(params, batch_stats, images, config, *, train: bool):
    """Encoder pass -> ((feature_map, pooled), new encoder batch_stats or the old ones if not train)."""
    variables = {"params": params["encoder"], "batch_stats": batch_stats["encoder"]}
    encoder = build_encoder(config.model)
    if not train:
        return encoder.apply(variables, images, train=False), batch_stats["encoder"]
    outputs, updates = encoder.apply(variables, images, train=True, mutable=["batch_stats"])
    return outputs, updates["batch_stats"]


def project(params, pooled, config) -> jax.Array:
    """Projection head + L2 normalisation: the embedding InfoNCE compares."""
    return contrastive.l2_normalize(projection_head(config).apply({"params": params["head"]}, pooled))


def embed(params, batch_stats, images, config, *, train: bool = True):
    """One encoder + head pass -> (Embedding, new batch_stats dict)."""
    (feature_map, pooled), encoder_stats = encode(params, batch_stats, images, config, train=train)
    new_stats = dict(batch_stats, encoder=encoder_stats)
    return Embedding(feature_map, pooled, project(params, pooled, config)), new_stats


def momentum_keys(state, images, rng, config):
    """Keys from the momentum encoder with shuffle-BN -> (keys [B, d] constant, new ema_batch_stats)."""
    batch = images.shape[0]
    order = jax.random.permutation(rng, batch) if config.moco.shuffle_bn else jnp.arange(batch)
    embedding, new_stats = embed(state.ema_params, state.ema_batch_stats, images[order], config)
    keys = embedding.projection[jnp.argsort(order)]
    return jax.lax.stop_gradient(keys), new_stats


def contrastive_loss_of_feature_map(params, keys, queue, config):
    """L_C as a function of the query's last feature map alone, weights frozen: what Grad-CAM
    differentiates (`gradcam.loss_gradient_wrt_feature_map`). Mirrors `encode`'s spatial mean pooling."""
    frozen = jax.lax.stop_gradient(params)

    def loss_of_feature_map(feature_map):
        pooled = jnp.mean(feature_map, axis=(1, 2))
        return contrastive.info_nce(project(frozen, pooled, config), keys, queue, config.moco.temperature)[0]

    return loss_of_feature_map


def contrastive_loss(params, state, view1, view2, rng, config):
    """L_C: MoCo v2 InfoNCE, optionally symmetrised. Returns (loss, aux) with the pieces other methods need.

    aux: 'keys' to enqueue, 'batch_stats' / 'ema_batch_stats' to store, 'query' (Embedding of view1),
    'metrics' (scalars).
    """
    key_rng, key_rng_swapped = jax.random.split(rng)
    query, batch_stats = embed(params, state.batch_stats, view1, config)
    keys, ema_batch_stats = momentum_keys(state, view2, key_rng, config)
    loss, accuracy = contrastive.info_nce(query.projection, keys, state.queue, config.moco.temperature)
    if config.moco.symmetric:
        query2, batch_stats = embed(params, batch_stats, view2, config)
        keys2, ema_batch_stats = momentum_keys(
            state.replace(ema_batch_stats=ema_batch_stats), view1, key_rng_swapped, config
        )
        loss2, accuracy2 = contrastive.info_nce(query2.projection, keys2, state.queue, config.moco.temperature)
        loss, accuracy = (loss + loss2) / 2, (accuracy + accuracy2) / 2
    aux = {
        "keys": keys,
        "batch_stats": batch_stats,
        "ema_batch_stats": ema_batch_stats,
        "query": query,
        "metrics": {"loss_contrastive": loss, "contrastive_accuracy": accuracy},
    }
    return loss, aux


def loss(params, state, view1, view2, rng, config, *, epoch):
    """MoCo v2's objective is L_C alone (`epoch`, the fractional training progress, is unused)."""
    del epoch
    total, aux = contrastive_loss(params, state, view1, view2, rng, config)
    aux["metrics"]["loss"] = total
    return total, aux


def eval_features(params, batch_stats, images, config, valid=None) -> jax.Array:
    """Frozen-encoder features for evaluation: the pooled vector of the query encoder (running BN stats).
    Each image's features are its own: `valid` (padding rows) changes nothing."""
    del valid
    (_, pooled), _ = encode(params, batch_stats, images, config, train=False)
    return pooled


def init_extras(config) -> dict:
    """MoCo keeps no untrained state besides the queue (which `TrainState` holds for every method)."""
    del config
    return {}


def optimizer_partitions(config) -> dict:
    """Every parameter follows the run's SGD (`optim.py`): no optimiser of its own."""
    del config
    return {}


def frozen_embeddings(state, images, config):
    """(query, keys) `Embedding`s of normalised [B, S, S, 3] images by the frozen online and momentum
    encoders (running BN statistics): what the figures take Grad-CAM and masks from."""
    query, _ = embed(state.params, state.batch_stats, images, config, train=False)
    keys, _ = embed(state.ema_params, state.ema_batch_stats, images, config, train=False)
    return query, keys


def gradcam_of_ssl_loss(state, query, keys, image_size: int, config) -> jax.Array:
    """Grad-CAM maps [B, S, S] in [0, 1] of L_C for the `frozen_embeddings` of a batch (negatives from
    the state's queue), resized to the image size S: what the SSL objective attends to."""
    loss_of_map = contrastive_loss_of_feature_map(state.params, keys.projection, state.queue, config)
    cam = gradcam.gradcam_maps(query.feature_map, gradcam.loss_gradient_wrt_feature_map(loss_of_map, query.feature_map))
    cam = cam / jnp.maximum(jnp.max(cam, axis=(1, 2), keepdims=True), 1e-12)
    return jax.image.resize(cam, (cam.shape[0], image_size, image_size), "bilinear")


def figure_arrays(state, images, rng, config) -> dict:
    """{'cam': Grad-CAM of the SSL loss} (`gradcam_of_ssl_loss`) as numpy."""
    del rng
    query, keys = frozen_embeddings(state, images, config)
    return jax.device_get({"cam": gradcam_of_ssl_loss(state, query, keys, images.shape[1], config)})


def validate(config) -> None:
    """`ConfigError` for MoCo knobs out of range (they are shared by every method built on MoCo)."""
    m = config.moco
    if not m.temperature > 0:
        raise ConfigError(f"config.moco.temperature={m.temperature} must be > 0 (MoCo v2: 0.2).")
    if not 0.0 <= m.momentum <= 1.0:
        raise ConfigError(f"config.moco.momentum={m.momentum} must lie in [0, 1] (MoCo v2: 0.999).")
    if m.head not in HEADS:
        raise ConfigError(f"config.moco.head={m.head!r}; choose one of {list(HEADS)} (MoCo v2: mlp, v1: linear).")
    if m.dim < 1 or m.queue_size < 0 or not 0.0 < m.queue_fraction <= 1.0:
        raise ConfigError(f"config.moco: dim={m.dim} must be >= 1, queue_size={m.queue_size} >= 0 and "
                          f"queue_fraction={m.queue_fraction} in (0, 1].")


def preflight_warnings(config, feature_map_shape) -> list:
    """MoCo's loss uses the pooled vector only: any feature map works."""
    del config, feature_map_shape
    return []
