"""Grad-CAM induced from the self-supervised loss, with `jax.grad` on the encoder's last feature map.

The SSL loss depends on the feature map A only through the pooled vector and the projection head, so
its gradient G = dL_C/dA comes from differentiating that short tail alone — no second backward pass
through the encoder. Grad-CAM's weights are computed from -G (lower loss is better, so the sign is
flipped relative to Grad-CAM on a class score).
"""
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

IMPORTANCE_SCORES = ("weight", "abs_weight", "grad_x_activation")


def loss_gradient_wrt_feature_map(loss_of_feature_map: Callable[[jax.Array], jax.Array],
                                  feature_map: jax.Array) -> jax.Array:
    """G = dL/dA at A = feature_map; A is a constant here (the result is used as a signal, not trained)."""
    return jax.grad(loss_of_feature_map)(jax.lax.stop_gradient(feature_map))


def channel_importance(feature_map: jax.Array, gradient: jax.Array, score: str = "weight") -> jax.Array:
    """Per-dimension importance [D] of the feature map for the SSL objective, averaged over the batch.

    score:
      'weight'     w_d = mean_{b,h,w}(-G_d): Grad-CAM's channel weight (the default).
      'abs_weight' |w_d|: importance regardless of direction.
      'grad_x_activation' mean_{b,h,w}(A_d * -G_d): gradient x activation, as LCR's rationale maps weight channels.
    """
    if score == "weight":
        return jnp.mean(-gradient, axis=(0, 1, 2))
    if score == "abs_weight":
        return jnp.abs(jnp.mean(-gradient, axis=(0, 1, 2)))
    if score == "grad_x_activation":
        return jnp.mean(feature_map * -gradient, axis=(0, 1, 2))
    raise ValueError(f"Unknown Grad-CAM score {score!r}; config.fgpair.gradcam_score is one of {IMPORTANCE_SCORES}.")


def gradcam_maps(feature_map: jax.Array, gradient: jax.Array) -> jax.Array:
    """Per-image Grad-CAM [B, h, w]: relu(sum_d w_bd A_bhwd), w_bd = mean_hw(-G_bhwd)."""
    weights = jnp.mean(-gradient, axis=(1, 2), keepdims=True)
    return jax.nn.relu(jnp.sum(weights * feature_map, axis=-1))


def normalize_map(cam: jax.Array, eps: float = 1e-8) -> jax.Array:
    """A [B, h, w] map as a spatial distribution (sums to 1); an all-zero map becomes uniform."""
    flat = cam.reshape(cam.shape[0], -1)
    total = jnp.sum(flat, axis=1, keepdims=True)
    uniform = jnp.full_like(flat, 1.0 / flat.shape[1])
    return jnp.where(total > eps, flat / jnp.maximum(total, eps), uniform).reshape(cam.shape)


def resized_cam(loss_of_feature_map: Callable[[jax.Array], jax.Array], feature_map: jax.Array,
                image_size: int) -> jax.Array:
    """Grad-CAM maps [B, S, S] in [0, 1] of a loss of the feature map [B, h, w, D] (each map divided by its
    maximum), resized bilinearly to the image size S: what a figure shows of what the loss attends to."""
    cam = gradcam_maps(feature_map, loss_gradient_wrt_feature_map(loss_of_feature_map, feature_map))
    cam = cam / jnp.maximum(jnp.max(cam, axis=(1, 2), keepdims=True), 1e-12)
    return jax.image.resize(cam, (cam.shape[0], image_size, image_size), "bilinear")


def figure_cam(query_and_loss: Callable, state, images: jax.Array, config) -> jax.Array:
    """`resized_cam` [B, S, S] float32 of a method's SSL loss on normalised `images` [B, S, S, 3], where
    `query_and_loss(state, images, config)` gives (the query embedding, its loss as a function of the
    feature map), e.g. `methods.moco.figure_query_and_loss`. One compiled program per method and config:
    op by op, Grad-CAM's few dozen small operations each compiled on their own."""
    return _figure_cam_program(query_and_loss, state, images, ml_collections.FrozenConfigDict(config))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _figure_cam_program(query_and_loss, state, images, config):
    query, loss_of_map = query_and_loss(state, images, config)
    return resized_cam(loss_of_map, query.feature_map, images.shape[1])
