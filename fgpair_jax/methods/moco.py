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


def config_sections(flat: dict) -> set:
    """The config sections this method reads (`methods.config_sections`)."""
    return {"moco"}
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


def momentum_keys(own, images, rng, config):
    """Keys from the momentum encoder (`own`: MoCo's method state) with shuffle-BN -> (keys [B, d]
    constant, new ema_batch_stats)."""
    batch = images.shape[0]
    order = jax.random.permutation(rng, batch) if config.moco.shuffle_bn else jnp.arange(batch)
    embedding, new_stats = embed(own["ema_params"], own["ema_batch_stats"], images[order], config)
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
    own = state.method_state
    query, batch_stats = embed(params, state.batch_stats, view1, config)
    keys, ema_batch_stats = momentum_keys(own, view2, key_rng, config)
    loss, accuracy = contrastive.info_nce(query.projection, keys, own["queue"], config.moco.temperature)
    if config.moco.symmetric:
        query2, batch_stats = embed(params, batch_stats, view2, config)
        keys2, ema_batch_stats = momentum_keys(dict(own, ema_batch_stats=ema_batch_stats), view1, key_rng_swapped,
                                               config)
        loss2, accuracy2 = contrastive.info_nce(query2.projection, keys2, own["queue"], config.moco.temperature)
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


def resolve_queue_size(config, num_train_examples) -> int:
    """Queue length K: `moco.queue_size`, or with 0 the largest multiple of the global batch that fits
    in `moco.queue_fraction` of the training set (`num_train_examples`; None: not known, only an explicit
    `moco.queue_size` resolves).

    Why a fraction: on a small fine-grained data set a MoCo-ImageNet queue (65,536) would hold every
    image many times over, its own earlier keys among the negatives; sizing it to part of one epoch
    keeps the negatives mostly other images.

    Raises `ConfigError` (naming a size that works, or why none does) when K is not a positive multiple
    of the global batch.
    """
    batch = config.global_batch_size
    if not config.moco.queue_size and num_train_examples is None:
        raise ConfigError("config.moco.queue_size=0 sizes the queue from the train split, whose size is not known "
                          "here; set config.moco.queue_size to a multiple of config.global_batch_size.")
    size = config.moco.queue_size or int(config.moco.queue_fraction * num_train_examples) // batch * batch
    if size >= batch and size % batch == 0:
        return size
    if config.moco.queue_size:
        what = f"config.moco.queue_size={size} is not a positive multiple of config.global_batch_size={batch}"
        if num_train_examples is None:
            raise ConfigError(f"{what}.")
    else:
        what = (f"the automatic MoCo queue (config.moco.queue_fraction={config.moco.queue_fraction} of "
                f"{num_train_examples} train images, in whole batches of {batch}) is empty")
    raise ConfigError(f"{what}; {queue_size_advice(batch, num_train_examples)}.")


def largest_safe_queue(batch: int, num_train_examples: int) -> int:
    """The largest multiple of `batch` below N - B (0 if none): a queue that never holds a query's own
    image from an earlier step of the epoch among its negatives (facebookresearch/moco#87)."""
    return max(0, (num_train_examples - batch - 1) // batch * batch)


def queue_size_advice(batch: int, num_train_examples: int) -> str:
    """What to set instead, in words: a safe queue size, or a smaller batch when none exists."""
    safe = largest_safe_queue(batch, num_train_examples)
    if safe >= batch:
        return f"set config.moco.queue_size to a multiple of {batch} below {num_train_examples - batch}, e.g. {safe}"
    return (f"{num_train_examples} train images hold fewer than three batches of {batch}, too few for a MoCo queue "
            f"of whole batches that excludes the query's own images; lower config.global_batch_size")


def state_sizes(config, num_train_examples) -> dict:
    """{'queue_size': K} (`resolve_queue_size`; raises its `ConfigError`)."""
    return {"queue_size": resolve_queue_size(config, num_train_examples)}


def data_warnings(config, num_train_examples: int) -> list:
    """A queue as large as the data: every query meets its own image among the negatives (moco#87)."""
    batch, count, queue = config.global_batch_size, num_train_examples, config.moco.queue_size
    if queue and queue >= count - batch:
        return [f"config.moco.queue_size={queue} is not below the {count} train images minus a batch "
                f"({count - batch}): every query's own image from an earlier step sits among its negatives "
                f"(facebookresearch/moco#87); {queue_size_advice(batch, count)}"]
    return []


QUEUE_STATE = ("ema_params", "ema_batch_stats", "queue", "queue_pointer")  # MoCo's own state, by name


def init_state(rng, variables, config, sizes) -> dict:
    """MoCo's own state: the momentum encoder (a copy of params[MOMENTUM_SUBTREES] and their batch
    statistics) and a queue of `sizes['queue_size']` random unit keys [K, moco.dim] with its int32 pointer."""
    params, batch_stats = variables["params"], variables["batch_stats"]
    momentum = {name: params[name] for name in MOMENTUM_SUBTREES}
    return {
        "ema_params": jax.tree.map(jnp.copy, momentum),
        "ema_batch_stats": jax.tree.map(jnp.copy, {k: v for k, v in batch_stats.items() if k in momentum}),
        "queue": contrastive.initial_queue(rng, sizes["queue_size"], config.moco.dim),
        "queue_pointer": jnp.zeros((), jnp.int32),
    }


def update_state(own, params, aux, config, *, step, total_steps) -> dict:
    """After the optimiser step: the momentum encoder follows the updated params at `moco.momentum`
    (constant in MoCo v2; `step`/`total_steps` unused), this step's keys replace the oldest in the queue,
    the key encoder's batch statistics are the key pass's (kept at their start with `model.keep_bn_stats`)."""
    del step, total_steps
    online = {name: params[name] for name in MOMENTUM_SUBTREES}
    queue, pointer = contrastive.enqueue(own["queue"], own["queue_pointer"], aux["keys"])
    return dict(own,
                ema_params=contrastive.ema_update(own["ema_params"], online, config.moco.momentum),
                ema_batch_stats=own["ema_batch_stats"] if config.model.keep_bn_stats else aux["ema_batch_stats"],
                queue=queue, queue_pointer=pointer)


def has_legacy_layout(config) -> bool:
    """MoCo's state had its fields in every `TrainState` before issue 24 (`state.LegacyTrainState`)."""
    del config
    return True


def to_legacy_fields(own) -> dict:
    """The format-2 fields of a MoCo-family method state: MoCo's four, the rest (fgpair's) as `extras`."""
    return {**{name: own[name] for name in QUEUE_STATE},
            "extras": {name: value for name, value in own.items() if name not in QUEUE_STATE}}


def from_legacy_fields(fields) -> dict:
    """The inverse of `to_legacy_fields`."""
    return {**{name: fields[name] for name in QUEUE_STATE}, **(fields["extras"] or {})}


def optimizer_partitions(config) -> dict:
    """Every parameter follows the run's SGD (`optim.py`): no optimiser of its own."""
    del config
    return {}


def frozen_embeddings(state, images, config):
    """(query, keys) `Embedding`s of normalised [B, S, S, 3] images by the frozen online and momentum
    encoders (running BN statistics): what the figures take Grad-CAM and masks from."""
    own = state.method_state
    query, _ = embed(state.params, state.batch_stats, images, config, train=False)
    keys, _ = embed(own["ema_params"], own["ema_batch_stats"], images, config, train=False)
    return query, keys


def term_gradients(params, state, aux, config) -> dict:
    """`methods.Method.term_gradients`: none (one loss term)."""
    del params, state, aux, config
    return {}


def label(config) -> str:
    """`methods.Method.label`: the method's name (`config.method`)."""
    return config.method


def loss_schedule(config) -> dict:
    """`methods.Method.loss_schedule`: InfoNCE alone, no schedule."""
    del config
    return {"formula": "L = L_C, MoCo's InfoNCE"}


def figure_arrays(state, images, rng, config) -> dict:
    """{'cam': Grad-CAM of the SSL loss} (`gradcam_of_ssl_loss`) as numpy."""
    del rng
    return jax.device_get({"cam": gradcam.figure_cam(figure_query_and_loss, state, images, config)})


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


# The base-method interface fgpair builds on (`methods/fgpair.py`; simsiam.py and byol.py define the same).
ssl_loss = contrastive_loss


def ssl_loss_of_feature_map(params, state, aux, config):
    """L_C as a function of the query's feature map, for Grad-CAM (`contrastive_loss_of_feature_map`)."""
    return contrastive_loss_of_feature_map(params, aux["keys"], state.method_state["queue"], config)


def pair_loss(params, state, image_a, image_b, rng, config):
    """InfoNCE between the online encoder on x_a and the momentum encoder on x_b [b, S, S, 3], negatives from
    the queue, batch statistic updates discarded -> (loss, {'pair_accuracy'})."""
    query, _ = embed(params, state.batch_stats, image_a, config)
    keys, _ = momentum_keys(state.method_state, image_b, rng, config)
    loss, accuracy = contrastive.info_nce(query.projection, keys, state.method_state["queue"], config.moco.temperature)
    return loss, {"pair_accuracy": accuracy}


def figure_query_and_loss(state, images, config):
    """(query Embedding of `images` by the frozen online encoder, L_C of its feature map with the frozen
    momentum encoder's keys of the same images and the state's queue): what figures take Grad-CAM of."""
    query, keys = frozen_embeddings(state, images, config)
    return query, contrastive_loss_of_feature_map(state.params, keys.projection, state.method_state["queue"], config)
