"""Decoders to images [B, S, S, 3] in the encoder's normalised input space: `Decoder` renders the pooled
feature vector [B, D] (the default); `SpatialDecoder` the last feature map [B, h, w, D]
(`fgpair.decode_from = "feature_map"`, this project's variant, not the paper's).

`Decoder`:
LayerNorm(h) -> two paths, summed:
- coarse: a zero-initialised linear map to an s x s RGB grid, bilinearly upsampled to S x S;
- detail: dense -> s x s grid -> (nearest x2 upsample, 3x3 conv, GroupNorm, ReLU) blocks -> 3x3 conv to RGB.

Why these pieces (at a quick run's budget, results/README.md): the detail path alone renders the same
mean-image blob for every input (pooled features are unnormalised and the conv stack learns slowly);
LayerNorm on the input plus the coarse path, which starts at zero and so adds nothing until it has
learnt something, give each image its own colour layout (a dark blob for a black bird, a red one for a
cardinal). GroupNorm, not
BatchNorm: the decoder's output must not depend on which images share its batch (the original and the
perturbed vector of an image are decoded in different batches), and it keeps no running statistics.
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
        batch = features.shape[0]
        features = nn.LayerNorm(name="input_norm")(features)

        coarse = nn.Dense(side * side * 3, kernel_init=nn.initializers.zeros, name="coarse")(features)
        coarse = jax.image.resize(coarse.reshape(batch, side, side, 3),
                                  (batch, self.image_size, self.image_size, 3), "bilinear")

        widths = [self.channels[min(i, len(self.channels) - 1)] for i in range(blocks)]
        start = widths[0] if widths else self.channels[0]
        x = nn.Dense(side * side * start, name="project")(features)
        x = nn.relu(x).reshape(batch, side, side, start)
        for i, width in enumerate(widths):
            x = jax.image.resize(x, (batch, x.shape[1] * 2, x.shape[2] * 2, x.shape[3]), "nearest")
            x = nn.Conv(width, (3, 3), use_bias=False, name=f"up{i}_conv")(x)  # GroupNorm removes a bias
            x = nn.relu(nn.GroupNorm(num_groups=min(8, width), name=f"up{i}_norm")(x))
        detail = nn.Conv(3, (3, 3), name="to_rgb")(x)
        return (coarse + detail).astype(jnp.float32)


class SpatialDecoder(nn.Module):
    """Feature map [B, h, w, D] -> image [B, S, S, 3] (`fgpair.decode_from = "feature_map"`).

    Why: decoded from the pooled vector, the image has no layout to keep, so every rendering is a soft
    colour field; decoded from the map, the decoder sees where each channel fires. The map is resized to
    ceil(S / 32) (an encoder's stride-32 grid), then LayerNorm over channels, a 1x1 projection,
    (nearest x2, 3x3 conv, GroupNorm, ReLU) blocks while doubling stays within S, a bilinear resize to S
    and a 3x3 conv to RGB. Any h, w: neither the parameters nor the blocks depend on them.
    """

    image_size: int
    channels: Sequence[int] = (128, 64, 32, 16)

    @nn.compact
    def __call__(self, feature_map: jax.Array) -> jax.Array:
        batch, start = feature_map.shape[0], -(-self.image_size // 32)
        x = jax.image.resize(feature_map, (batch, start, start, feature_map.shape[3]), "bilinear")
        x = nn.LayerNorm(name="input_norm")(x)
        x = nn.relu(nn.Conv(self.channels[0], (1, 1), name="project")(x))
        block = 0
        while x.shape[1] * 2 <= self.image_size:
            width = self.channels[min(block, len(self.channels) - 1)]
            x = jax.image.resize(x, (batch, x.shape[1] * 2, x.shape[2] * 2, x.shape[3]), "nearest")
            x = nn.Conv(width, (3, 3), use_bias=False, name=f"up{block}_conv")(x)
            x = nn.relu(nn.GroupNorm(num_groups=min(8, width), name=f"up{block}_norm")(x))
            block += 1
        x = jax.image.resize(x, (batch, self.image_size, self.image_size, x.shape[3]), "bilinear")
        return nn.Conv(3, (3, 3), name="to_rgb")(x).astype(jnp.float32)
