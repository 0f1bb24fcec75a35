"""Which feature dimensions are non-discriminative, and how they are perturbed: pure functions.

The method (`methods/fgpair.py`) marks a dimension non-discriminative when it varies little across
the batch (it fails to separate the data) or matters little to the SSL loss by Grad-CAM
(`gradcam.py`); only those dimensions of the pooled vector h (or, with `fgpair.decode_from =
feature_map`, those channels of the last feature map at every position) are perturbed, the decoder
renders h and the perturbed h', and the encoder learns that the two renderings are the same image.
"""
import jax
import jax.numpy as jnp

CRITERIA = ("both", "variance", "gradcam", "random", "none")
PERTURBATIONS = ("gaussian", "shuffle")
COMBINATIONS = ("union", "intersection")


def feature_variance(pooled: jax.Array, relative: bool = False, eps: float = 1e-6) -> jax.Array:
    """Variance of each dimension over the (global) batch [D]; `relative` divides by mean^2.

    Why relative: pooled post-ReLU dimensions differ in scale, so a dimension can have a small raw
    variance only because it is small; var/mean^2 (squared coefficient of variation) compares spread.
    """
    variance = jnp.var(pooled, axis=0)
    if relative:
        variance = variance / (jnp.square(jnp.mean(pooled, axis=0)) + eps)
    return variance


def update_variance_ema(ema: jax.Array, batch_variance: jax.Array, decay: float, initialized: jax.Array):
    """EMA of the per-dimension variance across steps; the first step takes the batch value."""
    updated = jnp.where(initialized, decay * ema + (1.0 - decay) * batch_variance, batch_variance)
    return updated, jnp.ones_like(initialized)


def lowest_fraction_mask(scores: jax.Array, fraction: float) -> jax.Array:
    """1.0 on the round(fraction * D) dimensions with the smallest score (ties: lower index), else 0.0."""
    dim = scores.shape[-1]
    count = int(round(fraction * dim))
    ranks = jnp.argsort(jnp.argsort(scores, stable=True), stable=True)
    return (ranks < count).astype(jnp.float32)


def combine_masks(first: jax.Array, second: jax.Array, mode: str) -> jax.Array:
    """'union' (either criterion) or 'intersection' (both criteria) of two {0,1} masks."""
    if mode == "union":
        return jnp.maximum(first, second)
    if mode == "intersection":
        return jnp.minimum(first, second)
    raise ValueError(f"config.fgpair.combine={mode!r}: use 'union' or 'intersection'.")


def random_mask(rng: jax.Array, count: jax.Array, dim: int) -> jax.Array:
    """A {0,1} mask of `count` uniformly random dimensions (count may be traced): the random ablation."""
    ranks = jnp.argsort(jax.random.uniform(rng, (dim,)))
    return (jnp.argsort(ranks) < count).astype(jnp.float32)


def perturb(rng: jax.Array, pooled: jax.Array, mask: jax.Array, mode: str = "gaussian",
            sigma: float = 1.0) -> jax.Array:
    """h' = h on unmasked dimensions (bit-identical); masked dimensions are perturbed.

    `pooled`: [B, D] vectors, or [B, h, w, D] feature maps (then a masked channel is perturbed at every
    position); `mask`: [D] in {0, 1}.
    'gaussian': h_d + eps_d with eps_d ~ N(0, (sigma * std_d)^2), std_d the std of dimension d over the
                batch (and positions), so every dimension is disturbed on its own scale.
    'shuffle':  h_d taken from another image of the batch (a random permutation).
    """
    if mode == "gaussian":
        std = jnp.std(pooled, axis=tuple(range(pooled.ndim - 1)), keepdims=True)
        perturbed = pooled + sigma * std * jax.random.normal(rng, pooled.shape, pooled.dtype)
    elif mode == "shuffle":
        perturbed = pooled[jax.random.permutation(rng, pooled.shape[0])]
    else:
        raise ValueError(f"config.fgpair.perturbation={mode!r}: use one of {PERTURBATIONS}.")
    return jnp.where(mask > 0, perturbed, pooled)
