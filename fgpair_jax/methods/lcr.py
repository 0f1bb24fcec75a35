"""LCR, "Learning Common Rationale" (Shu, van den Hengel, Liu; CVPR 2023), ported line by line from
the authors' code, GANPerf/LCR at commit fe591d4e (`moco/builder.py`, `main_moco.py`).

MoCo v2's InfoNCE L_C is unchanged; a rationale branch on the query encoder's last feature map
A [B, h, w, D] is fitted to a gradient x activation map of L_C:

  attention  a   = max_c relu(BN(conv1x1_{D->C}(A)))          builder.py `max_mask`: conv16 (no bias),
                                                                bn16, relu, torch.max(axis=1); C = 32
             att = (a - min a) / (1e-7 + max(a - min a))       `max_mask`: min and max over the whole
                                                                per-GPU batch, not per image
  target     g   = relu(sum_d A * dCE/dA)                      builder.py `forward`: grad_wrt_act1,
                                                                gradcam; CE is the per-GPU batch mean;
                                                                A is *not* detached: the target side
                                                                moves the encoder too (dCE/dA is a
                                                                constant: autograd.grad without create_graph)
  loss       KL  = sum_{n,h,w} q (log q - log p),               main_moco.py `train`: F.kl_div(
                   q = softmax_w(g), p = softmax_w(att)           att_max.softmax(dim=-1).log(),
                                                                  gradcam.softmax(dim=-1), reduction='sum'):
                                                                softmax over the last (width) axis of the
                                                                [N, 7, 7] map, summed over the per-GPU batch
             L   = L_C + nu * KL, nu = 0.01                    main_moco.py `--nu` (default 0.01)
  eval       f   = l2norm(mean_hw(A * att)), BN with running   builder.py `inference`: min-max over the
                   statistics                                   evaluation batch, AvgPool2d(7), normalize;
                                                                the evaluation batch is the per-GPU one
                                                                (main_moco.py: args.batch_size / ngpus
                                                                for val_loader too)

The per-GPU batch under one `jax.jit`: `config.model.bn_groups` contiguous groups of the global batch,
the same groups whose statistics the encoder's ghost batch norm uses for MoCo's shuffle-BN. Each group
has its own attention BN statistics and its own min-max, dCE/dA is the gradient of the group's mean
InfoNCE (the global mean's gradient x bn_groups), and the KL is summed within a group and averaged over
the groups, as DDP averages the per-GPU gradients of the per-GPU sums.

At evaluation the min-max runs over chunks of the per-GPU batch (`global_batch_size // bn_groups`) of
each evaluation batch, leaving out its padding rows, as LCR's validation loop sees its data; the
features of an image therefore depend on the images it is evaluated with, as in the original
(`lcr.eval_minmax='image'` normalises each image by itself instead). AvgPool2d(7) at 224 px is the mean
over the whole 7x7 map; at other sizes the port takes the mean over the whole map.

Where this port differs from the original, and why:
- The original also builds `qmax`/`kmax` heads and a second queue on the attention-pooled features;
  their logits (`output_max`) never enter the loss, so they are not ported.
- The original runs bn16 three times per step in train mode (query, key, query again), so its running
  statistics move three times per step, once with the momentum encoder's map; here they move once per
  step, from the query's map. Only evaluation reads them.
- The projection width is the run's `moco.dim` (128, MoCo v2's), shared with every method of a
  comparison; LCR's script defaults to `--moco-dim 256`.
- conv16 is initialised as torch's Conv2d default (kaiming_uniform with a = sqrt(5): uniform with
  variance 1 / (3 fan_in)), not flax's lecun_normal, whose 3x variance would slow its effective rate.
"""
import jax
import jax.numpy as jnp
from flax import linen as nn

from fgpair_jax import contrastive
from fgpair_jax.errors import ConfigError
from fgpair_jax.methods import moco
from fgpair_jax.models import feature_dim
from fgpair_jax.models.norm import GroupedBatchNorm

MOMENTUM_SUBTREES = moco.MOMENTUM_SUBTREES  # the attention branch has no momentum copy (builder.py)
ABLATIONS = {}
state_sizes = moco.state_sizes  # LCR is MoCo v2 plus a branch: MoCo's queue and momentum encoder
init_state = moco.init_state
update_state = moco.update_state
data_warnings = moco.data_warnings
has_legacy_layout = moco.has_legacy_layout
to_legacy_fields = moco.to_legacy_fields
from_legacy_fields = moco.from_legacy_fields
# An LCR checkpoint (main_moco.py: DDP(MoCo).state_dict()) holds builder.py's conv16 / bn16 beside
# `encoder_q`: they load into params/batch_stats['attention'] (`checkpoint_import.py`), so an LCR checkpoint
# is evaluated with its own attention-pooled feature. conv16_2/bn16_2, qmax/kmax and queue_max are unused.
CHECKPOINT_BRANCHES = {"attention": {"conv16": "conv", "bn16": "bn"}}


def config_sections(flat: dict) -> set:
    """The config sections this method reads (`methods.config_sections`): its own and MoCo's (its base)."""
    return {"lcr", "moco"}
optimizer_partitions = moco.optimizer_partitions  # the branch follows the run's SGD (main_moco.py: model.parameters())
figure_arrays = moco.figure_arrays
label = moco.label
term_gradients = moco.term_gradients  # the attention KL's share is not measured


def loss_schedule(config) -> dict:
    """`methods.Method.loss_schedule`: InfoNCE plus the attention KL at a constant weight."""
    return {"formula": f"L = L_C + ν·KL with ν = {config.lcr.nu:g} (L_C: MoCo's InfoNCE)"}
EVAL_MINMAX = ("batch", "image")
MINMAX_EPS = 1e-7  # builder.py max_mask / inference: img / (1e-7 + torch.max(img))


class AttentionBranch(nn.Module):
    """relu(BN(conv1x1_{D->channels}(A))): builder.py's conv16 (bias=False), bn16, relu.

    Attributes:
      channels: output channels C (LCR: `self.bilinear = 32`).
      num_groups: batch-norm statistic groups (`config.model.bn_groups`: LCR's per-GPU BN).
    """

    channels: int = 32
    num_groups: int = 1

    @nn.compact
    def __call__(self, feature_map, *, train: bool):
        torch_default = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # nn.Conv2d's reset_parameters
        x = nn.Conv(self.channels, (1, 1), use_bias=False, kernel_init=torch_default,
                    name="conv")(feature_map.astype(jnp.float32))
        x = GroupedBatchNorm(use_running_average=not train, num_groups=self.num_groups, name="bn")(x)
        return jax.nn.relu(x)


def _branch(config) -> AttentionBranch:
    return AttentionBranch(channels=config.lcr.attention_channels, num_groups=config.model.bn_groups)


def init_variables(rng: jax.Array, config) -> dict:
    """MoCo's variables plus params['attention'] and batch_stats['attention'] (the branch's conv and BN)."""
    moco_rng, branch_rng = jax.random.split(rng)
    variables = moco.init_variables(moco_rng, config)
    sample = jnp.zeros((config.model.bn_groups, 2, 2, feature_dim(config.model)))
    branch = _branch(config).init(branch_rng, sample, train=False)
    variables["params"]["attention"] = branch["params"]
    variables["batch_stats"]["attention"] = branch["batch_stats"]
    return variables


def channel_max_attention(params, batch_stats, feature_map, config, *, train: bool):
    """a = max over the branch's channels of relu(BN(conv(A))): [B, h, w] float32, >= 0, not yet min-max
    normalised; with the branch's new batch_stats (unchanged when not `train`)."""
    variables = {"params": params["attention"], "batch_stats": batch_stats["attention"]}
    if train:
        maps, updates = _branch(config).apply(variables, feature_map, train=True, mutable=["batch_stats"])
        new_stats = updates["batch_stats"]
    else:
        maps, new_stats = _branch(config).apply(variables, feature_map, train=False), batch_stats["attention"]
    return jnp.max(maps, axis=-1), new_stats


def minmax_normalize(attention: jax.Array, num_groups: int, valid=None) -> jax.Array:
    """(a - min a) / (1e-7 + max(a - min a)) with min and max over each of `num_groups` contiguous groups
    of the batch ([B, h, w] -> [B, h, w] in [0, 1]): builder.py `max_mask` over a per-GPU batch. Rows
    where `valid` (bool [B]) is False take no part in their group's min and max."""
    groups = attention.reshape((num_groups, -1) + attention.shape[1:])
    if valid is None:
        low = jnp.min(groups, axis=(1, 2, 3), keepdims=True)
        high = jnp.max(groups - low, axis=(1, 2, 3), keepdims=True)
    else:
        keep = valid.reshape((num_groups, -1, 1, 1))
        low = jnp.min(jnp.where(keep, groups, jnp.inf), axis=(1, 2, 3), keepdims=True)
        low = jnp.where(jnp.isfinite(low), low, 0.0)  # a group of padding only: any finite value
        high = jnp.max(jnp.where(keep, groups - low, 0.0), axis=(1, 2, 3), keepdims=True)
    return ((groups - low) / (MINMAX_EPS + high)).reshape(attention.shape)


def gradient_x_activation(feature_map: jax.Array, gradient: jax.Array) -> jax.Array:
    """LCR's target g = relu(sum_d A * dCE/dA): [B, h, w, D] x [B, h, w, D] -> [B, h, w]. The gradient is
    used as given (a constant); A carries its own gradient (builder.py `forward`: gradcam)."""
    return jax.nn.relu(jnp.sum(feature_map * jax.lax.stop_gradient(gradient), axis=-1))


def rowwise_kl(attention: jax.Array, target: jax.Array, num_groups: int) -> jax.Array:
    """sum KL(softmax_w(target) || softmax_w(attention)) over the rows (n, h) of each group, averaged
    over the `num_groups` groups: torch's F.kl_div(attention.softmax(-1).log(), target.softmax(-1),
    reduction='sum') on a per-GPU [n, h, w] batch, with DDP's mean over GPUs. Scalar float32."""
    log_p = jax.nn.log_softmax(attention.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(target.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(log_q) * (log_q - log_p)) / num_groups


def loss(params, state, view1, view2, rng, config, *, epoch):
    """L = L_C + lcr.nu * KL (module docstring); aux as `moco.contrastive_loss`'s, plus the attention
    branch's batch_stats and the metric 'loss_attention_kl' (the unweighted KL)."""
    del epoch
    groups = config.model.bn_groups
    loss_c, aux = moco.contrastive_loss(params, state, view1, view2, rng, config)
    feature_map = aux["query"].feature_map.astype(jnp.float32)
    loss_of_map = moco.contrastive_loss_of_feature_map(params, aux["keys"], state.method_state["queue"], config)
    # d(per-group mean CE)/dA = d(global mean)/dA * groups: the scale matters, the softmax is not scale-free.
    gradient = jax.grad(loss_of_map)(jax.lax.stop_gradient(feature_map)) * groups
    target = gradient_x_activation(feature_map, gradient)
    raw, branch_stats = channel_max_attention(params, state.batch_stats, feature_map, config, train=True)
    loss_kl = rowwise_kl(minmax_normalize(raw, groups), target, groups)
    total = loss_c + config.lcr.nu * loss_kl
    aux["batch_stats"] = dict(aux["batch_stats"], attention=branch_stats)
    aux["metrics"].update({"loss": total, "loss_attention_kl": loss_kl})
    return total, aux


def eval_features(params, batch_stats, images, config, valid=None) -> jax.Array:
    """[B, D] float32 L2-normalised mean over positions of A * att (builder.py `inference`), BN with its
    running statistics; att min-max normalised over each per-GPU-sized chunk of the batch, padding rows
    (`valid` False) left out, or per image (`lcr.eval_minmax`). B must be a multiple of the chunk."""
    (feature_map, _), _ = moco.encode(params, batch_stats, images, config, train=False)
    feature_map = feature_map.astype(jnp.float32)
    raw, _ = channel_max_attention(params, batch_stats, feature_map, config, train=False)
    batch = raw.shape[0]
    chunk = per_gpu_batch(config) if config.lcr.eval_minmax == "batch" else 1
    if batch % chunk:  # a batch smaller than one chunk (a figure's few images): one chunk
        chunk = batch
    weights = minmax_normalize(raw, batch // chunk, valid)
    return contrastive.l2_normalize(jnp.mean(feature_map * weights[..., None], axis=(1, 2)))


def per_gpu_batch(config) -> int:
    """LCR's per-GPU batch under one jit: one of `model.bn_groups` groups of the global batch."""
    return config.global_batch_size // config.model.bn_groups


def preflight_warnings(config, feature_map_shape) -> list:
    """LCR's KL is a softmax over the map's width: with w = 1 both distributions are 1 and the KL is 0,
    so lcr would train as moco (and its evaluation features become the pooled ones, rescaled)."""
    height, width, _ = feature_map_shape
    if width > 1:
        return []
    return [f"lcr: the encoder's last feature map is {height}x{width} at config.data.image_size="
            f"{config.data.image_size}, so LCR's row-wise attention KL (a softmax over the width) is identically "
            f"0 and lcr trains as moco; raise config.data.image_size"]


def validate(config) -> None:
    """`ConfigError` for LCR knobs out of range (and MoCo's, which LCR is built on)."""
    moco.validate(config)
    if config.lcr.attention_channels == 0:  # run_config.KEYS_ADDED_SINCE marks runs from before the port
        raise ConfigError("this lcr run was trained with the pre-port LCR attention (1x1 conv D -> 1, softmax over "
                          "positions), which is gone: train it again with this version (methods/lcr.py).")
    if config.lcr.nu < 0:
        raise ConfigError(f"config.lcr.nu={config.lcr.nu} must be >= 0 (LCR: 0.01).")
    if config.lcr.attention_channels < 1:
        raise ConfigError(f"config.lcr.attention_channels={config.lcr.attention_channels} must be >= 1 (LCR: 32).")
    if config.lcr.eval_minmax not in EVAL_MINMAX:
        raise ConfigError(f"config.lcr.eval_minmax={config.lcr.eval_minmax!r}; choose one of {list(EVAL_MINMAX)}.")
    if config.lcr.eval_minmax == "batch" and config.eval.batch_size % per_gpu_batch(config):
        raise ConfigError(f"config.eval.batch_size={config.eval.batch_size} must be a multiple of LCR's per-GPU batch "
                          f"{per_gpu_batch(config)} (global_batch_size / model.bn_groups): its evaluation min-max runs "
                          "over per-GPU chunks; or set config.lcr.eval_minmax='image'.")
    if config.moco.symmetric:
        raise ConfigError("config.moco.symmetric=True is not LCR's (its Grad-CAM target is of the one-sided MoCo v2 "
                          "loss); set it to False for method lcr.")
