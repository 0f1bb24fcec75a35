"""Decoder: pooled feature vector [B, D] -> image [B, S, S, 3] in the encoder's normalised input space.

Dense -> small s x s grid -> (nearest x2 upsample, 3x3 conv, GroupNorm, ReLU) blocks -> 3x3 conv to RGB.
GroupNorm, not BatchNorm: the decoder's output must not depend on which images share its batch (the
original and the perturbed vector of an image are decoded in different batches), and it keeps no
running statistics to checkpoint.
"""
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn


def decoder_geometry(image_size: int, max_start: int = 7) -> Tuple[int, int]:
    """(start side s, upsampling blocks n) with s * 2**n = image_size and s <= max_start.

    96 -> (6, 4), 112 -> (7, 4), 224 -> (7, 5), 32 -> (4, 3).
    """
    side, blocks = image_size, 0
    while side > max_start and side % 2 == 0:
        side, blocks = side // 2, blocks + 1
    if side > max_start:
        raise ValueError(
            f"config.data.image_size={image_size} cannot be reached by doubling from a grid of at most "
            f"{max_start}; use a size like 96, 112, 128, 160 or 224."
        )
    return side, blocks


class Decoder(nn.Module):
    """Feature vector -> image. `channels[i]` is the width after upsampling block i (last ones reused)."""

    image_size: int
    channels: Sequence[int] = (256, 128, 64, 32, 16)

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        side, blocks = decoder_geometry(self.image_size)
        widths = [self.channels[min(i, len(self.channels) - 1)] for i in range(blocks)]
        start = widths[0] if widths else self.channels[0]
        x = nn.Dense(side * side * start, name="project")(features)
        x = nn.relu(x).reshape(features.shape[0], side, side, start)
        for i, width in enumerate(widths):
            x = jax.image.resize(x, (x.shape[0], x.shape[1] * 2, x.shape[2] * 2, x.shape[3]), "nearest")
            x = nn.Conv(width, (3, 3), use_bias=False, name=f"up{i}_conv")(x)  # GroupNorm removes a bias
            x = nn.relu(nn.GroupNorm(num_groups=min(8, width), name=f"up{i}_norm")(x))
        return nn.Conv(3, (3, 3), name="to_rgb")(x).astype(jnp.float32)
