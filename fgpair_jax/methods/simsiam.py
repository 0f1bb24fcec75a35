"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021), as the authors'
code computes it (facebookresearch/simsiam `simsiam/builder.py`, `main_simsiam.py`).

  encoder    f: the run's encoder (pooled vector h [B, D]), one network for both views (no momentum copy)
  projector  z = g(h): Linear(D, D, no bias)-BN-ReLU, Linear(D, D, no bias)-BN-ReLU, Linear(D, dim)-BN
             without affine                                        builder.py `self.encoder.fc` (3 layers;
                                                                   hidden width = the encoder's, prev_dim)
  predictor  p = q(z): Linear(dim, pred_dim, no bias)-BN-ReLU-Linear(pred_dim, dim)
                                                                   builder.py `self.predictor` (2 layers)
  loss       L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2,            main_simsiam.py `train`: -(criterion(p1,
             D(p, z) = -mean_b cos(p_b, z_b)                        z2).mean() + criterion(p2, z1).mean())
                                                                    * 0.5, z detached in builder.py forward
  optimiser  the run's SGD; with `simsiam.fix_pred_lr` the predictor keeps the peak learning rate (no
             cosine decay)                                         main_simsiam.py `--fix-pred-lr`,
                                                                    `adjust_learning_rate` (fix_lr groups)
  batch norm statistics over the global batch, one pass per view  main_simsiam.py: SyncBatchNorm

Batch norm: SimSiam converts every BN to SyncBatchNorm, so its statistics are those of the whole global
batch of a view, not MoCo's per-GPU groups. Here the encoder is built with one BN group
(`model.bn_groups` is ignored by this method) and the heads' BN normalise the whole batch; under one
`jax.jit` the batch axis spans every device, so the statistics (and the step) do not depend on the
device count (tests/test_simsiam_byol.py).

Widths: SimSiam's ResNet-50 has D = 2048, dim = 2048 and pred_dim = 512 (dim / 4). `simsiam.dim` 0 means
the encoder's width D (2048 at ResNet-50, as the paper; 1280 for EfficientNet-Lite0), `simsiam.pred_dim` 0
means dim / 4, `simsiam.hidden_dim` 0 the encoder's width (builder.py's prev_dim).

The building blocks BYOL shares (`methods/byol.py`) are public here: `encode` (global BN), `apply_head`,
`output_std` (the paper's collapse monitor, Sec. 4.1 / Fig. 2).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fgpair_jax import contrastive, gradcam
from fgpair_jax.errors import ConfigError
from fgpair_jax.methods import moco
from fgpair_jax.models import build_encoder, feature_dim
from fgpair_jax.models.heads import BottleneckPredictor, SimSiamProjector

ABLATIONS = {}
CHECKPOINT_BRANCHES = {}  # imported checkpoints load the encoder only (checkpoint_import.py)


def config_sections(flat: dict) -> set:
    """The config sections this method reads (`methods.config_sections`)."""
    return {"simsiam"}
eval_features = moco.eval_features  # the pooled vector of the encoder with its running BN statistics
preflight_warnings = moco.preflight_warnings  # the loss uses the pooled vector only


class Views(NamedTuple):
    feature_map: jax.Array  # [B, h, w, D] last feature map of the encoder
    pooled: jax.Array  # [B, D] spatial mean of the feature map
    projection: jax.Array  # [B, dim] float32 projector output z
    prediction: jax.Array  # [B, dim] float32 predictor output p


def widths(config) -> tuple:
    """(hidden, dim, pred_dim) of `config.simsiam`, zeros resolved (module docstring)."""
    d = feature_dim(config.model)
    dim = config.simsiam.dim or d
    return config.simsiam.hidden_dim or d, dim, config.simsiam.pred_dim or max(1, dim // 4)


def projector(config) -> SimSiamProjector:
    hidden, dim, _ = widths(config)
    return SimSiamProjector(hidden_dim=hidden, out_dim=dim)


def predictor(config) -> BottleneckPredictor:
    _, dim, pred_dim = widths(config)
    return BottleneckPredictor(hidden_dim=pred_dim, out_dim=dim, hidden_bias=False)


def global_bn_model(model_config):
    """A copy of `model_config` (a ConfigDict, frozen or not) with one batch-norm group: statistics over
    the global batch (SyncBatchNorm)."""
    model = ml_collections.ConfigDict(model_config.to_dict())
    model.bn_groups = 1
    return model


def encode(params, batch_stats, images, config, *, train: bool):
    """Encoder pass with global-batch BN -> ((feature_map, pooled), new encoder batch_stats)."""
    variables = {"params": params["encoder"], "batch_stats": batch_stats["encoder"]}
    encoder = build_encoder(global_bn_model(config.model))
    if not train:
        return encoder.apply(variables, images, train=False), batch_stats["encoder"]
    outputs, updates = encoder.apply(variables, images, train=True, mutable=["batch_stats"])
    return outputs, updates["batch_stats"]


def apply_head(module, params, batch_stats, x, *, train: bool):
    """A head with BN -> (float32 output, new batch_stats; unchanged when not `train`)."""
    variables = {"params": params, "batch_stats": batch_stats}
    if not train:
        return module.apply(variables, x, train=False).astype(jnp.float32), batch_stats
    out, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    return out.astype(jnp.float32), updates["batch_stats"]


def init_variables(rng: jax.Array, config) -> dict:
    """Fresh {'params': {'encoder', 'projector', 'predictor'}, 'batch_stats': the same three}."""
    encoder_rng, projector_rng, predictor_rng = jax.random.split(rng, 3)
    size, (_, dim, _) = config.data.image_size, widths(config)
    encoder = build_encoder(global_bn_model(config.model)).init(encoder_rng, jnp.zeros((1, size, size, 3)), train=False)
    head = projector(config).init(projector_rng, jnp.zeros((2, feature_dim(config.model))), train=False)
    pred = predictor(config).init(predictor_rng, jnp.zeros((2, dim)), train=False)
    return {"params": {"encoder": encoder["params"], "projector": head["params"], "predictor": pred["params"]},
            "batch_stats": {"encoder": encoder["batch_stats"], "projector": head["batch_stats"],
                            "predictor": pred["batch_stats"]}}


def head_pass(params, batch_stats, pooled, config, *, train: bool):
    """(z, p, {'projector', 'predictor'} batch_stats) of pooled vectors [B, D]."""
    z, projector_stats = apply_head(projector(config), params["projector"], batch_stats["projector"], pooled,
                                    train=train)
    p, predictor_stats = apply_head(predictor(config), params["predictor"], batch_stats["predictor"], z, train=train)
    return z, p, {"projector": projector_stats, "predictor": predictor_stats}


def embed(params, batch_stats, images, config, *, train: bool = True):
    """Encoder + projector + predictor on normalised [B, S, S, 3] images -> (Views, new batch_stats)."""
    (feature_map, pooled), encoder_stats = encode(params, batch_stats, images, config, train=train)
    z, p, head_stats = head_pass(params, batch_stats, pooled, config, train=train)
    return Views(feature_map, pooled, z, p), dict(batch_stats, encoder=encoder_stats, **head_stats)


def negative_cosine(p: jax.Array, z: jax.Array) -> jax.Array:
    """D(p, z) = -mean_b cos(p_b, sg(z_b)) for [B, d] p and z: a float32 scalar in [-1, 1]; z gets no
    gradient (SimSiam Eq. 1 with the stop-gradient of Eq. 3)."""
    z = jax.lax.stop_gradient(z)
    p, z = contrastive.l2_normalize(p.astype(jnp.float32)), contrastive.l2_normalize(z.astype(jnp.float32))
    return -jnp.mean(jnp.sum(p * z, axis=-1))


def symmetric_loss(p1, z1, p2, z2) -> jax.Array:
    """L = D(p1, z2) / 2 + D(p2, z1) / 2 (SimSiam Eq. 2/3), a float32 scalar in [-1, 1]."""
    return 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)


def output_std(z: jax.Array) -> jax.Array:
    """Collapse monitor: the std over the batch of l2-normalised z [B, d], averaged over the d dimensions
    (SimSiam Sec. 4.1, Fig. 2): 0 when every output is one vector, about 1/sqrt(d) when spread over the sphere."""
    unit = contrastive.l2_normalize(jax.lax.stop_gradient(z).astype(jnp.float32))
    return jnp.mean(jnp.std(unit, axis=0))


def ssl_loss(params, state, view1, view2, rng, config):
    """The SimSiam loss of two views -> (loss, aux): aux 'batch_stats' (both passes, view 1 first, as the
    reference's two encoder calls), 'query' (Views of view 1), 'other' (Views of view 2), 'metrics'
    ('loss_ssl', 'output_std'). `rng` is unused (no shuffle, no queue)."""
    del rng
    first, batch_stats = embed(params, state.batch_stats, view1, config)
    second, batch_stats = embed(params, batch_stats, view2, config)
    loss = symmetric_loss(first.prediction, first.projection, second.prediction, second.projection)
    metrics = {"loss_ssl": loss, "output_std": output_std(first.projection)}
    return loss, {"batch_stats": batch_stats, "query": first, "other": second, "metrics": metrics}


def loss(params, state, view1, view2, rng, config, *, epoch):
    """SimSiam's objective alone (`epoch` unused)."""
    del epoch
    total, aux = ssl_loss(params, state, view1, view2, rng, config)
    aux["metrics"]["loss"] = total
    return total, aux


def one_sided_loss_of_feature_map(params, batch_stats, target, config, *, train: bool):
    """D(q(g(mean_hw A)), sg(target)) as a function of a feature map A alone (weights frozen; BN with the
    batch's statistics when `train`, updates discarded): what Grad-CAM differentiates."""
    frozen = jax.lax.stop_gradient(params)
    target = jax.lax.stop_gradient(target)

    def loss_of_feature_map(feature_map):
        _, p, _ = head_pass(frozen, batch_stats, jnp.mean(feature_map, axis=(1, 2)), config, train=train)
        return negative_cosine(p, target)

    return loss_of_feature_map


def ssl_loss_of_feature_map(params, state, aux, config):
    """The loss term of view 1's prediction, D(p1, sg(z2)), as a function of view 1's feature map."""
    return one_sided_loss_of_feature_map(params, state.batch_stats, aux["other"].projection, config, train=True)


def pair_loss(params, state, image_a, image_b, rng, config):
    """SimSiam's loss on a synthesized pair (x_a, x_b) [b, S, S, 3] -> (loss, {} metrics); the batch
    statistic updates are discarded (fgpair: only real images move running statistics)."""
    del rng
    a, _ = embed(params, state.batch_stats, image_a, config)
    b, _ = embed(params, state.batch_stats, image_b, config)
    return symmetric_loss(a.prediction, a.projection, b.prediction, b.projection), {}


def figure_query_and_loss(state, images, config):
    """(Views of `images` by the frozen network with running BN statistics, the loss of the feature map
    whose Grad-CAM the figures show: D(p, sg(z)) with the image itself as the other view)."""
    query, _ = embed(state.params, state.batch_stats, images, config, train=False)
    return query, one_sided_loss_of_feature_map(state.params, state.batch_stats, query.projection, config,
                                                train=False)


label = moco.label  # the method's name
term_gradients = moco.term_gradients  # one loss term


def loss_schedule(config) -> dict:
    """`methods.Method.loss_schedule`: the symmetric negative cosine alone, no schedule."""
    del config
    return {"formula": "L = L_C, SimSiam's symmetric negative cosine"}


def figure_arrays(state, images, rng, config) -> dict:
    """{'cam': Grad-CAM [B, S, S] of the SimSiam loss} as numpy."""
    del rng
    return jax.device_get({"cam": gradcam.figure_cam(figure_query_and_loss, state, images, config)})


def state_sizes(config, num_train_examples) -> dict:
    """SimSiam's state has no shape of its own: {}."""
    del config, num_train_examples
    return {}


def init_state(rng, variables, config, sizes) -> dict:
    """SimSiam keeps nothing outside params and batch statistics: no queue, no momentum copy."""
    del rng, variables, config, sizes
    return {}


def update_state(own, params, aux, config, *, step, total_steps) -> dict:
    """Nothing to update."""
    del params, aux, config, step, total_steps
    return own


def data_warnings(config, num_train_examples: int) -> list:
    del config, num_train_examples
    return []


def constant_sgd(config) -> optax.GradientTransformation:
    """The run's SGD (weight decay, momentum) at the constant peak learning rate: SimSiam's `fix_lr` group."""
    return optax.chain(optax.add_decayed_weights(config.optim.weight_decay),
                       optax.sgd(config.optim.learning_rate, momentum=config.optim.momentum))


def optimizer_partitions(config) -> dict:
    """With `simsiam.fix_pred_lr` the predictor's learning rate is not decayed (main_simsiam.py --fix-pred-lr)."""
    return {"predictor": constant_sgd(config)} if config.simsiam.fix_pred_lr else {}


def validate(config) -> None:
    """`ConfigError` for SimSiam knobs out of range."""
    for key in ("dim", "pred_dim", "hidden_dim"):
        if config.simsiam[key] < 0:
            raise ConfigError(f"config.simsiam.{key}={config.simsiam[key]} must be >= 0 (0: the default width, "
                              "methods/simsiam.py).")
