"""BYOL (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020), as the paper and deepmind-research
`byol/` (byol_experiment.py, utils/networks.py, utils/schedules.py, utils/helpers.py) define it.

  online   encoder f, projector g: MLP Linear(D, 4096)-BN-ReLU-Linear(4096, 256), predictor q: the same
           MLP on 256                                            networks.py `MLP` (hk.Linear has a bias)
  target   encoder and projector with EMA weights xi <- tau_k xi + (1 - tau_k) theta, no predictor
  tau_k    = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, tau_base 0.996 (paper Sec. 3.2; schedules.py
           `target_ema`), k the step, K the run's steps
  loss     ||q(z1)/|q(z1)| - sg(z'2)/|z'2| ||^2 = 2 - 2 cos, mean over the batch, symmetrised by summing
           both views' terms (paper Eq. 2, L + L~; helpers.py `regression_loss`)
  BN       cross-replica (global-batch) statistics (networks.py: hk.BatchNorm(cross_replica_axis='i'));
           here one BN group over the global batch, as SimSiam (`simsiam.encode`)

Where this port differs, and why: BYOL trains with LARS (lr 0.2 x B/256, weight decay 1.5e-6, biases and
BN excluded); this project trains every method with the run's SGD schedule, so a comparison changes the
method only. The target network's BN runs in training mode on each view (its running statistics,
unused by evaluation, follow those passes). `byol.hidden_dim` 0 = twice the encoder's width (4096 at
ResNet-50).
"""
import jax
import jax.numpy as jnp

from fgpair_jax import contrastive, gradcam
from fgpair_jax.errors import ConfigError
from fgpair_jax.methods import moco, simsiam
from fgpair_jax.methods.simsiam import Views, apply_head, encode, output_std
from fgpair_jax.models import build_encoder, feature_dim
from fgpair_jax.models.heads import BottleneckPredictor

ABLATIONS = {}
CHECKPOINT_BRANCHES = {}  # imported checkpoints load the encoder only (checkpoint_import.py)


def config_sections(flat: dict) -> set:
    """The config sections this method reads (`methods.config_sections`)."""
    return {"byol"}
TARGET_SUBTREES = ("encoder", "projector")  # params subtrees with a target (EMA) copy: no predictor
eval_features = moco.eval_features  # the online encoder's pooled vector, running BN statistics
preflight_warnings = moco.preflight_warnings
state_sizes = simsiam.state_sizes  # nothing sized by the data
data_warnings = simsiam.data_warnings


def mlp(config, out_dim: int) -> BottleneckPredictor:
    """BYOL's MLP: Linear(hidden)-BN-ReLU-Linear(out), hidden = `byol.hidden_dim` or 2 x the encoder width."""
    hidden = config.byol.hidden_dim or 2 * feature_dim(config.model)
    return BottleneckPredictor(hidden_dim=hidden, out_dim=out_dim, hidden_bias=True)


def init_variables(rng: jax.Array, config) -> dict:
    """Fresh {'params': {'encoder', 'projector', 'predictor'}, 'batch_stats': the same three}."""
    encoder_rng, projector_rng, predictor_rng = jax.random.split(rng, 3)
    size, dim = config.data.image_size, config.byol.dim
    encoder = build_encoder(simsiam.global_bn_model(config.model)).init(encoder_rng, jnp.zeros((1, size, size, 3)),
                                                                        train=False)
    head = mlp(config, dim).init(projector_rng, jnp.zeros((2, feature_dim(config.model))), train=False)
    pred = mlp(config, dim).init(predictor_rng, jnp.zeros((2, dim)), train=False)
    return {"params": {"encoder": encoder["params"], "projector": head["params"], "predictor": pred["params"]},
            "batch_stats": {"encoder": encoder["batch_stats"], "projector": head["batch_stats"],
                            "predictor": pred["batch_stats"]}}


def init_state(rng, variables, config, sizes) -> dict:
    """The target network: copies of params[TARGET_SUBTREES] and of their batch statistics."""
    del rng, config, sizes
    return {"target_params": {k: jax.tree.map(jnp.copy, variables["params"][k]) for k in TARGET_SUBTREES},
            "target_batch_stats": {k: jax.tree.map(jnp.copy, variables["batch_stats"][k]) for k in TARGET_SUBTREES}}


def target_momentum(base: float, step, total_steps: int) -> jax.Array:
    """tau_k = 1 - (1 - base) (cos(pi k / K) + 1) / 2, k = `step` clipped to K = `total_steps` (float32)."""
    k = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps)
    return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * k / total_steps) + 1.0) / 2.0


def update_state(own, params, aux, config, *, step, total_steps) -> dict:
    """The target follows the updated online weights at tau_k (`target_momentum` of the step before this
    update); its batch statistics are the target passes' (kept with `model.keep_bn_stats`)."""
    tau = target_momentum(config.byol.base_momentum, step, total_steps)
    online = {k: params[k] for k in TARGET_SUBTREES}
    return {"target_params": contrastive.ema_update(own["target_params"], online, tau),
            "target_batch_stats": own["target_batch_stats"] if config.model.keep_bn_stats
            else aux["target_batch_stats"]}


def online(params, batch_stats, images, config, *, train: bool = True):
    """Online encoder + projector + predictor -> (Views, new batch_stats)."""
    (feature_map, pooled), encoder_stats = encode(params, batch_stats, images, config, train=train)
    z, projector_stats = apply_head(mlp(config, config.byol.dim), params["projector"], batch_stats["projector"],
                                    pooled, train=train)
    p, predictor_stats = apply_head(mlp(config, config.byol.dim), params["predictor"], batch_stats["predictor"], z,
                                    train=train)
    stats = dict(batch_stats, encoder=encoder_stats, projector=projector_stats, predictor=predictor_stats)
    return Views(feature_map, pooled, z, p), stats


def target(target_params, target_batch_stats, images, config, *, train: bool = True):
    """Target encoder + projector -> (z' [B, dim] float32 constant, new target batch_stats)."""
    (_, pooled), encoder_stats = encode(target_params, target_batch_stats, images, config, train=train)
    z, projector_stats = apply_head(mlp(config, config.byol.dim), target_params["projector"],
                                    target_batch_stats["projector"], pooled, train=train)
    return jax.lax.stop_gradient(z), {"encoder": encoder_stats, "projector": projector_stats}


def regression_loss(p: jax.Array, z: jax.Array) -> jax.Array:
    """mean_b ||p_b/|p_b| - sg(z_b)/|z_b| ||^2 = mean_b (2 - 2 cos(p_b, z_b)) for [B, d]: float32 in [0, 4]."""
    z = jax.lax.stop_gradient(z)
    p, z = contrastive.l2_normalize(p.astype(jnp.float32)), contrastive.l2_normalize(z.astype(jnp.float32))
    return jnp.mean(jnp.sum(jnp.square(p - z), axis=-1))


def symmetric_loss(p1, p2, target1, target2) -> jax.Array:
    """L + L~ = regression(p1, z'2) + regression(p2, z'1) (paper Eq. 2), float32 in [0, 8]."""
    return regression_loss(p1, target2) + regression_loss(p2, target1)


def ssl_loss(params, state, view1, view2, rng, config):
    """BYOL's loss of two views -> (loss, aux): 'batch_stats', 'target_batch_stats', 'query' (online Views
    of view 1), 'target2' (z' of view 2), 'metrics' ('loss_ssl', 'output_std' of the online z1)."""
    del rng
    own = state.method_state
    first, batch_stats = online(params, state.batch_stats, view1, config)
    second, batch_stats = online(params, batch_stats, view2, config)
    target1, target_stats = target(own["target_params"], own["target_batch_stats"], view1, config)
    target2, target_stats = target(own["target_params"], target_stats, view2, config)
    loss = symmetric_loss(first.prediction, second.prediction, target1, target2)
    return loss, {"batch_stats": batch_stats, "target_batch_stats": target_stats, "query": first,
                  "target2": target2, "metrics": {"loss_ssl": loss, "output_std": output_std(first.projection)}}


def loss(params, state, view1, view2, rng, config, *, epoch):
    """BYOL's objective alone (`epoch` unused: tau follows the step, `update_state`)."""
    del epoch
    total, aux = ssl_loss(params, state, view1, view2, rng, config)
    aux["metrics"]["loss"] = total
    return total, aux


def one_sided_loss_of_feature_map(params, batch_stats, target_projection, config, *, train: bool):
    """regression(q(g(mean_hw A)), sg(z')) as a function of a feature map A alone, weights frozen."""
    frozen = jax.lax.stop_gradient(params)

    def loss_of_feature_map(feature_map):
        pooled = jnp.mean(feature_map, axis=(1, 2))
        z, _ = apply_head(mlp(config, config.byol.dim), frozen["projector"], batch_stats["projector"], pooled,
                          train=train)
        p, _ = apply_head(mlp(config, config.byol.dim), frozen["predictor"], batch_stats["predictor"], z, train=train)
        return regression_loss(p, target_projection)

    return loss_of_feature_map


def ssl_loss_of_feature_map(params, state, aux, config):
    """View 1's term, regression(q1, sg(z'2)), as a function of view 1's feature map (Grad-CAM)."""
    return one_sided_loss_of_feature_map(params, state.batch_stats, aux["target2"], config, train=True)


def pair_loss(params, state, image_a, image_b, rng, config):
    """BYOL's loss on a synthesized pair (x_a, x_b) -> (loss, {}); batch statistic updates discarded."""
    del rng
    own = state.method_state
    a, _ = online(params, state.batch_stats, image_a, config)
    b, _ = online(params, state.batch_stats, image_b, config)
    target_a, _ = target(own["target_params"], own["target_batch_stats"], image_a, config)
    target_b, _ = target(own["target_params"], own["target_batch_stats"], image_b, config)
    return symmetric_loss(a.prediction, b.prediction, target_a, target_b), {}


def figure_query_and_loss(state, images, config):
    """(online Views of `images`, frozen, running BN statistics; the loss of the feature map the figures
    take Grad-CAM of: regression(q, sg(z')) with the target network's z' of the same images)."""
    own = state.method_state
    query, _ = online(state.params, state.batch_stats, images, config, train=False)
    target_projection, _ = target(own["target_params"], own["target_batch_stats"], images, config, train=False)
    return query, one_sided_loss_of_feature_map(state.params, state.batch_stats, target_projection, config,
                                                train=False)


label = moco.label  # the method's name
term_gradients = moco.term_gradients  # one loss term


def loss_schedule(config) -> dict:
    """`methods.Method.loss_schedule`: the symmetrised regression loss alone, no schedule."""
    del config
    return {"formula": "L = L_C, BYOL's regression loss of the two views"}


def figure_arrays(state, images, rng, config) -> dict:
    """{'cam': Grad-CAM [B, S, S] of the BYOL loss} as numpy."""
    del rng
    return jax.device_get({"cam": gradcam.figure_cam(figure_query_and_loss, state, images, config)})


def optimizer_partitions(config) -> dict:
    """Every parameter follows the run's SGD (see the module docstring on LARS)."""
    del config
    return {}


def validate(config) -> None:
    """`ConfigError` for BYOL knobs out of range."""
    if not 0.0 <= config.byol.base_momentum <= 1.0:
        raise ConfigError(f"config.byol.base_momentum={config.byol.base_momentum} must lie in [0, 1] (BYOL: 0.996).")
    if config.byol.dim < 1 or config.byol.hidden_dim < 0:
        raise ConfigError(f"config.byol: dim={config.byol.dim} must be >= 1 and hidden_dim={config.byol.hidden_dim} "
                          ">= 0 (0: twice the encoder's width).")
