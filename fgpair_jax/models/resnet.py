"""ResNet-18/50 encoders (NHWC), torchvision layout, returning the last feature map and its pooled vector.

Module names follow torchvision (`conv1`, `bn1`, `layer1_0`, ..., `downsample_conv`), so converting a
torchvision state dict (`pretrained.py`) is a rename plus a transpose. ResNet v1.5: the stride of a
bottleneck sits on its 3x3 convolution, as in torchvision.
"""
import functools
from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from fgpair_jax.models.conv import conv_general_dilated
from fgpair_jax.models.heads import trunk_outputs
from fgpair_jax.models.norm import GroupedBatchNorm


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut: ResNet-18/34."""

    features: int
    strides: int = 1
    norm: Any = GroupedBatchNorm
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    expansion = 1

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                                 conv_general_dilated=conv_general_dilated(self.conv_impl))
        y = conv(self.features, (3, 3), (self.strides,) * 2, padding=((1, 1), (1, 1)), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
        y = self.norm(name="bn2")(y)
        if x.shape[-1] != self.features or self.strides != 1:
            x = conv(self.features, (1, 1), (self.strides,) * 2, name="downsample_conv")(x)
            x = self.norm(name="downsample_bn")(x)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 with 4x expansion: ResNet-50/101/152."""

    features: int
    strides: int = 1
    norm: Any = GroupedBatchNorm
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    expansion = 4

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                                 conv_general_dilated=conv_general_dilated(self.conv_impl))
        out_features = self.features * self.expansion
        y = conv(self.features, (1, 1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = conv(self.features, (3, 3), (self.strides,) * 2, padding=((1, 1), (1, 1)), name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = conv(out_features, (1, 1), name="conv3")(y)
        y = self.norm(name="bn3")(y)
        if x.shape[-1] != out_features or self.strides != 1:
            x = conv(out_features, (1, 1), (self.strides,) * 2, name="downsample_conv")(x)
            x = self.norm(name="downsample_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet trunk. `__call__(x, train)` returns `(feature_map [B,h,w,D], pooled [B,D])`.

    Attributes:
      stage_sizes: blocks per stage.
      block: BasicBlock or Bottleneck.
      bn_groups: batch-norm groups (see `norm.GroupedBatchNorm`).
      dtype: computation dtype (bfloat16 on accelerators; params stay float32).
      width: channels of the stem and first stage (64 in the real ResNets; small for tests).
      num_classes: if > 0, an ImageNet-style `fc` classifier is added and its logits returned as a
        third output (used only to check imported ImageNet weights).
      conv_impl: "auto" | "xla" | "im2col": how each convolution is computed (models/conv.py; the same
        parameters and, to float rounding, the same numbers).
    """

    stage_sizes: Sequence[int]
    block: Any
    bn_groups: int = 1
    dtype: Any = jnp.float32
    num_classes: int = 0
    width: int = 64
    conv_impl: str = "auto"

    @property
    def feature_dim(self) -> int:
        return 8 * self.width * self.block.expansion

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = functools.partial(
            GroupedBatchNorm, use_running_average=not train, num_groups=self.bn_groups, dtype=self.dtype
        )
        x = x.astype(self.dtype)
        x = nn.Conv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False, dtype=self.dtype,
                    conv_general_dilated=conv_general_dilated(self.conv_impl), name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, num_blocks in enumerate(self.stage_sizes):
            for index in range(num_blocks):
                strides = 2 if stage > 0 and index == 0 else 1
                x = self.block(self.width * 2**stage, strides, norm=norm, dtype=self.dtype,
                               conv_impl=self.conv_impl, name=f"layer{stage + 1}_{index}")(x)
        return trunk_outputs(x, self.num_classes)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)
# One block per stage, 8 channels: for unit tests and smoke runs, compiles in seconds on a CPU.
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), block=BasicBlock, width=8)
