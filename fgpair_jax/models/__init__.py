"""Encoder registry: `build_encoder(config.model)` returns a linen module whose
`apply(variables, images, train=...)` gives `(feature_map [B,h,w,D], pooled [B,D])`.

Add an encoder by registering a constructor `fn(model_config) -> nn.Module` in `ENCODERS`.
"""
from typing import Callable, Dict

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from fgpair_jax.models import efficientnet_lite, resnet

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _dtype(model_config) -> jnp.dtype:
    name = model_config.get("dtype", "float32")
    if name not in _DTYPES:
        raise ValueError(f"config.model.dtype={name!r} is not one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


ENCODERS: Dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {
    "resnet18": lambda c: resnet.ResNet18(bn_groups=c.bn_groups, dtype=_dtype(c)),
    "resnet50": lambda c: resnet.ResNet50(bn_groups=c.bn_groups, dtype=_dtype(c)),
    "resnet_tiny": lambda c: resnet.ResNetTiny(bn_groups=c.bn_groups, dtype=_dtype(c)),  # tests, smoke runs
    "efficientnet_lite0": lambda c: efficientnet_lite.EfficientNetLite0(
        bn_groups=c.bn_groups, dtype=_dtype(c), depthwise_impl=c.get("depthwise_impl", "auto"),
        frozen_stages=c.get("frozen_stages", 0)),
}

FEATURE_DIMS = {"resnet18": 512, "resnet50": 2048, "resnet_tiny": 64, "efficientnet_lite0": 1280}


def build_encoder(model_config) -> nn.Module:
    """The encoder named by `model_config.name`, or a clear error listing the registered ones."""
    if model_config.name not in ENCODERS:
        raise ValueError(
            f"Unknown encoder config.model.name={model_config.name!r}; choose one of {sorted(ENCODERS)}."
        )
    return ENCODERS[model_config.name](model_config)


# Input scaling each encoder's pretrained weights expect, as (mean, std) of [0, 1] pixels. The packaged
# EfficientNet-Lite0 (TF lineage) was trained on (x - 127) / 128 of 0-255 pixels, not ImageNet mean/std.
_IMAGENET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INPUT_NORMALIZATION = {"efficientnet_lite0": ((127 / 255,) * 3, (128 / 255,) * 3)}


def input_normalization(model_config):
    """(mean, std) per RGB channel of [0, 1] pixels for the named encoder (ImageNet's by default)."""
    return INPUT_NORMALIZATION.get(model_config.name, _IMAGENET_NORMALIZATION)


def frozen_modules(model_config) -> tuple:
    """Top-level encoder modules whose parameters must not change (`model.frozen_stages`)."""
    if model_config.name == "efficientnet_lite0":
        return efficientnet_lite.frozen_module_names(model_config.get("frozen_stages", 0))
    if model_config.get("frozen_stages", 0):
        raise ValueError(f"config.model.frozen_stages is supported for efficientnet_lite0 only, not "
                         f"{model_config.name!r}; set it to 0.")
    return ()


def feature_dim(model_config) -> int:
    """Width D of the pooled feature vector of the named encoder."""
    return FEATURE_DIMS[model_config.name]
