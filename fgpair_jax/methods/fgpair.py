"""fgpair (Wang et al., ECCV 2024): learn to ignore non-discriminative feature dimensions from
synthesized pairs. L = L_C + alpha * L_R + nu * L_Cp.

The SSL method underneath, `fgpair.base` (`BASES`: moco, the paper's and the default; simsiam or byol,
the negative-free baselines the paper also reports against), gives L_C, its own state and L_Cp's form.

One step, as this project reads the paper (README "Our reading"; every choice is a `config.fgpair` knob):
1. L_C: the base's loss on the two augmented views (`<base>.ssl_loss`; MoCo v2's InfoNCE by default);
   h = pooled features of view 1.
2. Grad-CAM from L_C (view 1's term) on the last feature map (`gradcam.py`) -> per-dimension importance w.
3. Per-dimension variance v of h over the global batch (optionally an EMA across steps).
4. Non-discriminative mask m: lowest fractions by v and by w, combined (union by default).
5. h' = h perturbed on m only (`synthesis.perturb`); with `decode_from='feature_map'` the last feature
   map A is perturbed instead, the masked channels at every position.
6. Decoder d: L_R = mean |d(sg(h)) - x1|^2 — the decoder learns only from L_R (unless
   `reconstruction_trains_encoder`, the first author's prototype's choice).
7. The pair, by `pair_mode` (`PAIR_MODES`): x_a = sg(d(h)), x_b = sg(d(h')) (default, the abstract's
   reading), or x_a = x1, x_b = x1 + sg(d(h') - d(h)) ('residual', this project's variant).
   L_Cp = the base's loss on (x_a, x_b) (`<base>.pair_loss`): with moco InfoNCE(g(f(x_a)), g_ema(f_ema(x_b)),
   queue); with simsiam D(p_a, sg z_b)/2 + D(p_b, sg z_a)/2; with byol the symmetrised 2 - 2cos of the online
   prediction and the target projection. The encoder learns that images differing only in
   non-discriminative dimensions are the same image.
   L_Cp starts after `warmup_epochs` (the decoder first learns to render) and ramps in linearly.
   With `pair_stride` k > 1 only every k-th image of the batch is rendered and paired (cost knob).
Batch-norm running statistics are updated only by real images: the synthesized batches are normalised
with their own batch statistics, but their statistic updates are discarded.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from fgpair_jax import gradcam, synthesis
from fgpair_jax.errors import ConfigError
from fgpair_jax.methods import byol, moco, simsiam
from fgpair_jax.models import feature_dim
from fgpair_jax.models.decoder import Decoder, SpatialDecoder, decoder_geometry

BASES = {"moco": moco, "simsiam": simsiam, "byol": byol}  # fgpair.base -> the SSL method underneath
CHECKPOINT_BRANCHES = moco.CHECKPOINT_BRANCHES  # the paper releases no checkpoint of its own
eval_features = moco.eval_features  # the pooled vector of the encoder with running BN statistics (every base)
preflight_warnings = moco.preflight_warnings  # Grad-CAM's channel weights are defined on any map, 1x1 included


def config_sections(flat: dict) -> set:
    """The config sections this method reads (`methods.config_sections`): its own and its base's."""
    base = BASES.get(flat.get("fgpair.base", "moco"), moco)
    return {"fgpair"} | base.config_sections(flat)
# Experiment arms: the method itself and the ablations of which dimensions are perturbed.
ABLATIONS = {"fgpair": {"fgpair.criterion": "both"},
             "fgpair_residual": {"fgpair.criterion": "both", "fgpair.pair_mode": "residual"},
             **{criterion: {"fgpair.criterion": criterion} for criterion in synthesis.CRITERIA if criterion != "both"},
             # The synthesized-pair idea on a negative-free base (compare with the `simsiam` / `byol` arms).
             "fgpair_simsiam": {"fgpair.criterion": "both", "fgpair.base": "simsiam"},
             "fgpair_byol": {"fgpair.criterion": "both", "fgpair.base": "byol"}}
# (the base's arm, the fgpair arm on that base): the pairs a comparison shows side by side, in order.
COMPARED_ARMS = (("moco", "fgpair"), ("simsiam", "fgpair_simsiam"), ("byol", "fgpair_byol"))
DECODER_OPTIMIZERS = ("adam", "sgd")
# How the pair is made from the decoder's renderings d(h), d(h') and the real view x (`pair_images`);
# the titles' {h} is what the decoder renders (`pair_titles`).
PAIR_MODES = {
    "decoded": ("x_a = d({h})", "x_b = d({h}')"),  # the abstract's reading: both images synthesized
    "residual": ("x_a = x", "x_b = x + d({h}') - d({h})"),  # a real image carrying the rendered perturbation
}


DECODE_FROM = ("pooled", "feature_map")  # what the decoder renders: h [B, D], or the map A [B, h, w, D]


def pair_titles(config) -> tuple:
    """What x_a and x_b are under `fgpair.pair_mode` and `fgpair.decode_from`, for figure titles:
    e.g. ("x_a = d(h)", "x_b = d(h')"), or with d rendering the feature map A: "x_a = d(A)"."""
    rendered = "A" if config.fgpair.decode_from == "feature_map" else "h"
    return tuple(title.format(h=rendered) for title in PAIR_MODES[config.fgpair.pair_mode])


def decoder(config):
    """The decoder of `fgpair.decode_from`: `Decoder` (pooled vector) or `SpatialDecoder` (feature map)."""
    module = SpatialDecoder if config.fgpair.decode_from == "feature_map" else Decoder
    return module(image_size=config.data.image_size, channels=tuple(config.fgpair.decoder_channels))


def decoder_input(query, config) -> jax.Array:
    """What the decoder renders of the query embedding: h [B, D] or the last feature map [B, h, w, D]."""
    return query.feature_map if config.fgpair.decode_from == "feature_map" else query.pooled


def base_method(config):
    """The module of `fgpair.base` (`BASES`); `ConfigError` for another name."""
    if config.fgpair.base not in BASES:
        raise ConfigError(f"config.fgpair.base={config.fgpair.base!r}: use one of {tuple(BASES)}.")
    return BASES[config.fgpair.base]


def init_variables(rng: jax.Array, config) -> dict:
    """The base's variables (encoder and heads), plus the decoder's parameters under params['decoder']."""
    moco_rng, decoder_rng = jax.random.split(rng)
    variables = base_method(config).init_variables(moco_rng, config)
    dim = feature_dim(config.model)
    sample = jnp.zeros((1, 2, 2, dim) if config.fgpair.decode_from == "feature_map" else (1, dim))
    decoder_params = decoder(config).init(decoder_rng, sample)["params"]
    variables["params"]["decoder"] = decoder_params
    return variables


VARIANCE_STATE = ("feature_variance", "variance_initialized")


def state_sizes(config, num_train_examples) -> dict:
    """The base's sizes (MoCo's queue length; none for simsiam and byol)."""
    return base_method(config).state_sizes(config, num_train_examples)


def data_warnings(config, num_train_examples: int) -> list:
    return base_method(config).data_warnings(config, num_train_examples)


def init_state(rng, variables, config, sizes) -> dict:
    """The base's state (MoCo's queue and momentum encoder, BYOL's target network, SimSiam's nothing) plus
    the EMA of per-dimension feature variance: 'feature_variance' float32 [D], 'variance_initialized' bool."""
    return {**base_method(config).init_state(rng, variables, config, sizes),
            "feature_variance": jnp.zeros((feature_dim(config.model),), jnp.float32),
            "variance_initialized": jnp.zeros((), jnp.bool_)}


def update_state(own, params, aux, config, *, step, total_steps) -> dict:
    """The base's update of its own part, and this step's variance EMA (`aux['extras']`)."""
    base_own = {name: value for name, value in own.items() if name not in VARIANCE_STATE}
    base_own = base_method(config).update_state(base_own, params, aux, config, step=step, total_steps=total_steps)
    return {**base_own, **aux["extras"]}


def has_legacy_layout(config) -> bool:
    """fgpair on MoCo had the pre-issue-24 layout (the variance EMA was its `extras`)."""
    return config.fgpair.base == "moco"


to_legacy_fields = moco.to_legacy_fields
from_legacy_fields = moco.from_legacy_fields


def decoder_optimizer(config) -> optax.GradientTransformation:
    """The decoder's own optimiser, `fgpair.decoder_optimizer` at a constant `decoder_learning_rate`
    (our reading: the paper does not say).

    Why not the encoder's SGD: a decoder trained from scratch by SGD at the fine-tuning learning rate
    renders grey noise after a quick run's steps, where Adam already renders coloured layouts
    (results/README.md). It learns only from L_R, so its optimiser does not change what the encoder
    optimises.
    """
    c = config.fgpair
    if c.decoder_optimizer == "adam":
        return optax.adam(c.decoder_learning_rate)
    return optax.sgd(c.decoder_learning_rate, momentum=config.optim.momentum)


def optimizer_partitions(config) -> dict:
    """The decoder (params['decoder']) trains with `decoder_optimizer`; the base's own partitions (SimSiam's
    predictor with `simsiam.fix_pred_lr`) as the base trains them; the rest with the run's SGD."""
    return {**base_method(config).optimizer_partitions(config), "decoder": decoder_optimizer(config)}


def pair_weight(config, epoch: jax.Array) -> jax.Array:
    """nu_t, a float32 scalar: 0 during the decoder warm-up, then a linear ramp over `ramp_epochs` up to
    `nu`; with `ramp_epochs` = 0 a step from 0 to `nu` at `warmup_epochs`. `epoch` is a scalar, fractional
    (step / steps per epoch)."""
    c = config.fgpair
    if c.ramp_epochs > 0:
        ramp = jnp.clip((epoch - c.warmup_epochs) / c.ramp_epochs, 0.0, 1.0)
    else:
        ramp = jnp.where(jnp.asarray(epoch) >= c.warmup_epochs, 1.0, 0.0)
    return c.nu * ramp


def ranking_variance(extras, batch_variance, config) -> jax.Array:
    """The per-dimension variance [D] the mask ranks by: the EMA in `extras` (the method state) when
    `variance_ema_decay` > 0 and it has been set, else this batch's."""
    if config.fgpair.variance_ema_decay > 0:
        return jnp.where(extras["variance_initialized"], extras["feature_variance"], batch_variance)
    return batch_variance


def gradcam_importance(loss_of_map, query, config) -> jax.Array:
    """Per-dimension importance [D] of the query feature map for L_C (`loss_of_map`: L_C as a function of
    that map, `<base>.ssl_loss_of_feature_map`), by Grad-CAM (`gradcam.py`)."""
    gradient = gradcam.loss_gradient_wrt_feature_map(loss_of_map, query.feature_map)
    return gradcam.channel_importance(query.feature_map, gradient, config.fgpair.gradcam_score)


def nondiscriminative_mask(rng, importance, variance, config) -> jax.Array:
    """The {0,1} mask [D] of dimensions to perturb, by `config.fgpair.criterion`.

    'both' (default): lowest `variance_fraction` by variance, combined (`combine`) with lowest
    `gradcam_fraction` by importance. 'variance' / 'gradcam': one criterion. 'random': as many random
    dimensions as 'both' would pick (the ablation). 'none': no dimension (pairs differ only by BN groups).
    """
    c = config.fgpair
    by_variance = synthesis.lowest_fraction_mask(variance, c.variance_fraction)
    by_gradcam = synthesis.lowest_fraction_mask(importance, c.gradcam_fraction)
    if c.criterion == "variance":
        return by_variance
    if c.criterion == "gradcam":
        return by_gradcam
    both = synthesis.combine_masks(by_variance, by_gradcam, c.combine)
    if c.criterion == "both":
        return both
    if c.criterion == "random":
        return synthesis.random_mask(rng, jnp.sum(both), both.shape[0])
    if c.criterion == "none":
        return jnp.zeros_like(both)
    raise ValueError(f"config.fgpair.criterion={c.criterion!r}: use one of {synthesis.CRITERIA}.")


def synthesize_pair(params, features, mask, rng, config):
    """(d(h) with decoder gradient, sg(d(h'))), both [b, S, S, 3] float32 in the encoder's input
    normalisation: the reconstruction and the perturbed rendering of `features` ([b, D] pooled or
    [b, h, w, D] map, `decoder_input`), the channels where `mask` [D] is 1 perturbed (at every position
    of a map). The encoder gets L_R's gradient only with `reconstruction_trains_encoder`."""
    h = features if config.fgpair.reconstruction_trains_encoder else jax.lax.stop_gradient(features)
    perturbed = synthesis.perturb(rng, jax.lax.stop_gradient(features), mask, config.fgpair.perturbation,
                                  config.fgpair.sigma)
    render = decoder(config).apply
    reconstruction = render({"params": params["decoder"]}, h)
    rendered_perturbed = render({"params": jax.lax.stop_gradient(params["decoder"])}, perturbed)
    return reconstruction, jax.lax.stop_gradient(rendered_perturbed)


def pair_images(reconstruction, rendered_perturbed, real, config):
    """(x_a, x_b) [b, S, S, 3], constants, by `fgpair.pair_mode` (`PAIR_MODES`).

    'decoded': x_a = d(h), x_b = d(h'): decoder artefacts are shared by both, but when the decoder
    renders soft layouts the two are nearly the same image. 'residual': x_a = x, x_b = x + d(h') - d(h):
    a sharp real image carrying exactly the decoder's rendering of the perturbation (this project's
    variant, not the paper's). `real` [b, S, S, 3] is the view the reconstruction was fitted to.

    Raises:
      ValueError: an unknown `pair_mode` (`validate` reports it earlier as a ConfigError).
    """
    reconstruction = jax.lax.stop_gradient(reconstruction)
    rendered_perturbed = jax.lax.stop_gradient(rendered_perturbed)
    if config.fgpair.pair_mode == "decoded":
        return reconstruction, rendered_perturbed
    if config.fgpair.pair_mode == "residual":
        real = jax.lax.stop_gradient(real)
        return real, real + rendered_perturbed - reconstruction
    raise ValueError(f"config.fgpair.pair_mode={config.fgpair.pair_mode!r}: use one of {tuple(PAIR_MODES)}.")


def contrast_ratio_each(image_a, image_b, images) -> jax.Array:
    """Each pair's contrast, float32 [b]: mean |x_b - x_a| over one pair's pixels (`image_a`, `image_b`
    [b, S, S, 3]) / mean |x_i - x_j| over pairs of different real images (each image of `images`
    [B, S, S, 3], B >= 2, against the next one; same normalisation). 0 means the pair is one image twice;
    1 means its images differ as much as two different photos do. This project's diagnostic (issue 14),
    not the paper's."""
    between_images = jnp.mean(jnp.abs(images - jnp.roll(images, 1, axis=0)))
    return jnp.mean(jnp.abs(image_b - image_a), axis=(1, 2, 3)) / jnp.maximum(between_images, 1e-12)


def contrast_ratio(image_a, image_b, images) -> jax.Array:
    """`pair_contrast`, a float32 scalar: the mean of `contrast_ratio_each` over the pairs, i.e. mean
    |x_b - x_a| over all pairs' pixels / mean |x_i - x_j| over different real images."""
    return jnp.mean(contrast_ratio_each(image_a, image_b, images))


def synthesized_pair_loss(params, state, image_a, image_b, rng, config):
    """L_Cp -> (loss, metrics): the base's loss on the pair (x_a, x_b) [b, S, S, 3] (`<base>.pair_loss`;
    batch statistic updates discarded). MoCo's adds 'pair_accuracy'."""
    return base_method(config).pair_loss(params, state, image_a, image_b, rng, config)


def loss(params, state, view1, view2, rng, config, *, epoch):
    """L = L_C + alpha * L_R + nu_t * L_Cp; aux as the base's `ssl_loss` plus fgpair metrics and 'extras'
    (the variance EMA, `update_state`)."""
    base = base_method(config)
    contrastive_rng, mask_rng, perturb_rng, pair_rng = jax.random.split(rng, 4)
    loss_c, aux = base.ssl_loss(params, state, view1, view2, contrastive_rng, config)
    query = aux["query"]

    extras = state.method_state
    batch_variance = synthesis.feature_variance(jax.lax.stop_gradient(query.pooled),
                                                relative=config.fgpair.relative_variance)
    variance_ema, initialized = synthesis.update_variance_ema(
        extras["feature_variance"], batch_variance, config.fgpair.variance_ema_decay,
        extras["variance_initialized"])
    variance = ranking_variance({"feature_variance": variance_ema, "variance_initialized": initialized},
                                batch_variance, config)
    importance = gradcam_importance(base.ssl_loss_of_feature_map(params, state, aux, config), query, config)
    mask = nondiscriminative_mask(mask_rng, importance, variance, config)

    stride = config.fgpair.pair_stride  # every stride-th image gets a pair (spread over all devices)
    real = view1[::stride]
    reconstruction, rendered_perturbed = synthesize_pair(params, decoder_input(query, config)[::stride], mask,
                                                         perturb_rng, config)
    loss_r = jnp.mean(jnp.square(reconstruction - jax.lax.stop_gradient(real)))
    image_a, image_b = pair_images(reconstruction, rendered_perturbed, real, config)

    nu_t = pair_weight(config, epoch)
    # Computed in every step (its weight is 0 during the warm-up): a lax.cond around it was slower on
    # CPU than always computing it (results/README.md).
    loss_cp, pair_metrics = synthesized_pair_loss(params, state, image_a, image_b, pair_rng, config)
    total = loss_c + config.fgpair.alpha * loss_r + nu_t * loss_cp
    if config.fgpair.log_gradient_share:  # what `term_gradients` recomputes L_Cp from, on logged steps
        aux["pair_inputs"] = jax.lax.stop_gradient({"image_a": image_a, "image_b": image_b, "nu_t": nu_t,
                                                    "rng": jax.random.key_data(pair_rng)})
    aux["extras"] = {"feature_variance": variance_ema, "variance_initialized": initialized}
    aux["metrics"].update({
        "loss": total,
        "loss_reconstruction": loss_r,
        "loss_pair": loss_cp,
        **pair_metrics,
        "pair_weight": nu_t,
        "pair_contrast": contrast_ratio(image_a, image_b, jax.lax.stop_gradient(view1)),
        "mask_fraction": jnp.mean(mask),
    })
    return total, aux


def term_gradients(params, state, aux, config) -> dict:
    """`methods.Method.term_gradients`: {'pair': {'encoder': d(nu_t L_Cp)/d(encoder params)}} with
    `fgpair.log_gradient_share`, else {}: L_Cp recomputed from the step's pair (`aux['pair_inputs']`, the
    images, nu_t and the key the loss used), so the share is that step's exactly. One more backward
    pass through the encoder, which the step runs on logged steps only."""
    if "pair_inputs" not in aux:
        return {}
    inputs = aux["pair_inputs"]
    rng = jax.random.wrap_key_data(inputs["rng"])

    def weighted_pair_loss(encoder):
        return inputs["nu_t"] * synthesized_pair_loss(dict(params, encoder=encoder), state, inputs["image_a"],
                                                      inputs["image_b"], rng, config)[0]
    return {"pair": {"encoder": jax.grad(weighted_pair_loss)(params["encoder"])}}


def label(config) -> str:
    """`methods.Method.label`: the method and its base, e.g. 'fgpair (base simsiam)'."""
    return f"{config.method} (base {config.fgpair.base})"


def variant_text(config) -> str:
    """The pair's variant as a figure names it, e.g. 'criterion both (union), gaussian perturbation
    (sigma 1.0), pair_mode decoded, decoder renders h, base moco', from a run's `config.fgpair`."""
    c = config.fgpair
    perturbation = f"{c.perturbation} perturbation" + (f" (sigma {c.sigma})" if c.perturbation == "gaussian" else "")
    return (f"criterion {c.criterion} ({c.combine}), {perturbation}, pair_mode {c.pair_mode}, "
            f"decoder renders {'A' if c.decode_from == 'feature_map' else 'h'}, base {c.base}")


def loss_schedule(config) -> dict:
    """`methods.Method.loss_schedule`: the paper's total with the config's alpha and nu_t schedule; the
    phases and the weight (`pair_weight`) when nu > 0."""
    c = config.fgpair
    if c.ramp_epochs > 0:
        schedule = f"ν_t = 0 until epoch {c.warmup_epochs:g}, then linear to ν = {c.nu:g} at epoch " \
                   f"{c.warmup_epochs + c.ramp_epochs:g}"
    else:
        schedule = f"ν_t = 0 until epoch {c.warmup_epochs:g}, then ν = {c.nu:g}"
    described = {"formula": f"L = L_C + α·L_R + ν_t·L_Cp with α = {c.alpha:g}, {schedule} (L_C: {c.base}'s loss)"}
    if c.nu > 0:
        described["phases"] = (float(c.warmup_epochs), float(c.warmup_epochs + c.ramp_epochs))
        described["weight"] = lambda epochs: np.asarray(pair_weight(config, jnp.asarray(epochs, jnp.float32)))
    return described


def figure_arrays(state, images, rng, config) -> dict:
    """The base method's Grad-CAM figure plus the synthesized pair of each image: 'pair_a', 'pair_b' (normalised
    [B, S, S, 3], made as `fgpair.pair_mode` makes them), 'pair_titles' (what each shows), 'pair_variant'
    (`variant_text`), 'pair_contrast_each' ([B] float32, `contrast_ratio_each` against the figure batch),
    the 'mask' [D] and 'diagnostics' (`pair_diagnostics`, Python floats). The mask uses a training step's
    criteria on `images` as the batch (the state's variance EMA when the run ranks by it), with the frozen
    encoder's running BN statistics and no augmentation, so it is the figure batch's mask, not a training
    batch's. The arrays come from one compiled program (`figure_program`): op by op, each small operation
    compiled on its own, most of the figures' time on a CPU."""
    out = jax.device_get(figure_program(state, images, rng, ml_collections.FrozenConfigDict(config)))
    out["diagnostics"] = {name: float(value) for name, value in out["diagnostics"].items()}
    out["pair_titles"], out["pair_variant"] = pair_titles(config), variant_text(config)
    return out


@functools.partial(jax.jit, static_argnums=3)
def figure_program(state, images, rng, config) -> dict:
    """The arrays of `figure_arrays` (device arrays; 'diagnostics' as float32 scalars), jitted with the
    config a static (frozen, hashable) argument."""
    mask_rng, perturb_rng = jax.random.split(rng)
    query, loss_of_map = base_method(config).figure_query_and_loss(state, images, config)
    importance = gradcam_importance(loss_of_map, query, config)
    batch_variance = synthesis.feature_variance(query.pooled, relative=config.fgpair.relative_variance)
    mask = nondiscriminative_mask(mask_rng, importance, ranking_variance(state.method_state, batch_variance, config),
                                  config)
    reconstruction, rendered_perturbed = synthesize_pair(state.params, decoder_input(query, config), mask,
                                                         perturb_rng, config)
    pair_a, pair_b = pair_images(reconstruction, rendered_perturbed, images, config)
    return {"cam": gradcam.resized_cam(loss_of_map, query.feature_map, images.shape[1]),
            "pair_a": pair_a, "pair_b": pair_b, "mask": mask,
            "pair_contrast_each": contrast_ratio_each(pair_a, pair_b, images),
            "diagnostics": pair_diagnostics(state, images, query.pooled, pair_a, pair_b, config)}


def pair_diagnostics(state, images, real_features, pair_a, pair_b, config) -> dict:
    """How different the pair is, as images and as the frozen encoder sees it, relative to two different
    real images, as float32 scalars (traceable): 'pair_contrast' (`contrast_ratio`) and
    'pair_feature_distance' = mean ||f(x_a) - f(x_b)|| / mean ||f(x_i) - f(x_j)|| of the evaluation
    features f (pooled, running BN statistics). `images` [B, S, S, 3] (B >= 2) are unaugmented figure
    images, every one paired (`pair_a`, `pair_b` [B, S, S, 3]), so this 'pair_contrast' differs from the
    training log's (augmented view, every `pair_stride`-th image). `real_features` [B, D] are f of
    `images`, computed by the caller. This project's diagnostic (issue 14), not the paper's."""
    def feature_distance(a, b):
        return jnp.mean(jnp.linalg.norm(a - b, axis=-1))

    f = {"a": eval_features(state.params, state.batch_stats, pair_a, config),
         "b": eval_features(state.params, state.batch_stats, pair_b, config), "real": real_features}
    between_images = feature_distance(f["real"], jnp.roll(f["real"], 1, axis=0))
    return {"pair_contrast": contrast_ratio(pair_a, pair_b, images),
            "pair_feature_distance": feature_distance(f["a"], f["b"]) / jnp.maximum(between_images, 1e-12)}


def validate(config) -> None:
    """`ConfigError` for fgpair knobs out of range (its base's are checked too); a logged warning (no error)
    when `warmup_epochs` >= `num_epochs`, so that L_Cp would never switch on."""
    base_method(config).validate(config)
    c = config.fgpair
    choices = {"criterion": synthesis.CRITERIA, "combine": synthesis.COMBINATIONS, "pair_mode": tuple(PAIR_MODES), "decode_from": DECODE_FROM,
               "perturbation": synthesis.PERTURBATIONS, "gradcam_score": gradcam.IMPORTANCE_SCORES,
               "decoder_optimizer": DECODER_OPTIMIZERS}
    for key, allowed in choices.items():
        if c[key] not in allowed:
            raise ConfigError(f"config.fgpair.{key}={c[key]!r}: use one of {allowed}.")
    for key in ("variance_fraction", "gradcam_fraction"):
        if not 0.0 <= c[key] <= 1.0:
            raise ConfigError(f"config.fgpair.{key}={c[key]} must lie in [0, 1].")
    for key in ("alpha", "nu", "sigma", "warmup_epochs", "ramp_epochs", "decoder_learning_rate"):
        if c[key] < 0:
            raise ConfigError(f"config.fgpair.{key}={c[key]} must be >= 0.")
    if not 0.0 <= c.variance_ema_decay < 1.0:
        raise ConfigError(f"config.fgpair.variance_ema_decay={c.variance_ema_decay} must lie in [0, 1).")
    if c.pair_stride < 1:
        raise ConfigError(f"config.fgpair.pair_stride={c.pair_stride} must be >= 1 (1 = every image gets a pair).")
    if c.decode_from == "pooled":  # the vector decoder doubles a small grid up to the image size exactly
        try:
            decoder_geometry(config.data.image_size)
        except ValueError as error:
            raise ConfigError(f"{error} (fgpair's decoder, fgpair.decode_from='pooled')") from None
    pairs = -(-config.global_batch_size // c.pair_stride)
    if c.base == "moco" and pairs % config.model.bn_groups:  # simsiam and byol normalise the whole batch
        raise ConfigError(f"config.fgpair.pair_stride={c.pair_stride} leaves {pairs} synthesized images per batch, "
                          f"which config.model.bn_groups={config.model.bn_groups} batch-norm groups cannot split; "
                          "choose a stride that keeps a multiple of bn_groups.")
    if c.nu > 0 and 0 < config.num_epochs <= c.warmup_epochs:
        logging.warning("config.fgpair.warmup_epochs=%s >= config.num_epochs=%s: L_Cp never switches on, so this "
                        "run is MoCo plus a decoder; lower fgpair.warmup_epochs or train longer.",
                        c.warmup_epochs, config.num_epochs)
