"""Encoder registry: one `Encoder` record per name in `ENCODERS`, chosen by `config.model.name`.

A record holds every fact about an encoder the rest of the code needs: how to build it (a linen module
whose `apply(variables, images, train=...)` gives `(feature_map [B,h,w,D], pooled [B,D])`), its feature
width D, the input scaling its pretrained weights expect, which top-level modules `model.frozen_stages`
freezes, and where its ImageNet weights come from (`model.init="imagenet"`). Adding an encoder is one
entry in `ENCODERS`.
"""
import dataclasses
import functools
import os
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from fgpair_jax import pretrained
from fgpair_jax.errors import ConfigError
from fgpair_jax.models import efficientnet_lite, resnet

IMAGENET = "imagenet"  # config.model.init value: the record's ImageNet weights
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
Normalization = Tuple[Tuple[float, float, float], Tuple[float, float, float]]  # (mean, std) of [0, 1] pixels
IMAGENET_NORMALIZATION: Normalization = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _no_frozen_stages(frozen_stages: int) -> Tuple[str, ...]:
    if frozen_stages:
        raise ConfigError(f"config.model.frozen_stages={frozen_stages} is supported for efficientnet_lite0 only; "
                          "set it to 0.")
    return ()


@dataclasses.dataclass(frozen=True)
class Encoder:
    build: Callable[..., nn.Module]  # (bn_groups=, dtype=, frozen_stages=, depthwise_impl=, conv_impl=) -> module
    feature_dim: int  # width D of the pooled feature vector
    normalization: Normalization = IMAGENET_NORMALIZATION  # input scaling of its pretrained weights
    frozen_modules: Callable[[int], Tuple[str, ...]] = _no_frozen_stages  # frozen_stages -> module names
    imagenet_weights: Optional[Callable[[], str]] = None  # -> path of a torch checkpoint (may download)


def _resnet(constructor):
    return lambda bn_groups, dtype, conv_impl="auto", **unused: constructor(bn_groups=bn_groups, dtype=dtype,
                                                                           conv_impl=conv_impl)


def _torchvision(name: str) -> Callable[[], str]:
    return lambda: pretrained.torchvision_checkpoint_path(name)


ENCODERS = {
    "resnet18": Encoder(_resnet(resnet.ResNet18), 512, imagenet_weights=_torchvision("resnet18")),
    "resnet50": Encoder(_resnet(resnet.ResNet50), 2048, imagenet_weights=_torchvision("resnet50")),
    # ResNet-18 at half width (32-256 channels, D = 256): the CPU test bed's encoder (configs/cub.py:scratch),
    # ~4x fewer multiply-adds than ResNet-18; no pretrained weights.
    "resnet18_half": Encoder(_resnet(functools.partial(resnet.ResNet18, width=32)), 256),
    "resnet_tiny": Encoder(_resnet(resnet.ResNetTiny), 64),  # tests and smoke runs; no pretrained weights
    # The packaged EfficientNet-Lite0 (TF lineage) was trained on (x - 127) / 128 of 0-255 pixels.
    "efficientnet_lite0": Encoder(efficientnet_lite.EfficientNetLite0, 1280,
                                  normalization=((127 / 255,) * 3, (128 / 255,) * 3),
                                  frozen_modules=efficientnet_lite.frozen_module_names,
                                  imagenet_weights=pretrained.imagenet_checkpoint_path),
}


def encoder_record(model_config) -> Encoder:
    """The `Encoder` named by `model_config.name`; `ConfigError` listing the registered names otherwise."""
    if model_config.name not in ENCODERS:
        raise ConfigError(f"Unknown encoder config.model.name={model_config.name!r}; choose one of "
                          f"{sorted(ENCODERS)}.")
    return ENCODERS[model_config.name]


def compute_dtype(model_config) -> jnp.dtype:
    name = model_config.get("dtype", "float32")
    if name not in DTYPES:
        raise ConfigError(f"config.model.dtype={name!r} is not one of {sorted(DTYPES)}.")
    return DTYPES[name]


def build_encoder(model_config) -> nn.Module:
    """The linen encoder module of `model_config` (name, dtype, bn_groups, frozen_stages, depthwise_impl,
    conv_impl)."""
    return encoder_record(model_config).build(
        bn_groups=model_config.bn_groups, dtype=compute_dtype(model_config),
        frozen_stages=model_config.get("frozen_stages", 0), depthwise_impl=model_config.get("depthwise_impl", "auto"),
        conv_impl=model_config.get("conv_impl", "auto"))


def input_normalization(model_config) -> Normalization:
    """(mean, std) per RGB channel of [0, 1] pixels that the named encoder expects."""
    return encoder_record(model_config).normalization


def frozen_modules(model_config) -> Tuple[str, ...]:
    """Top-level encoder modules whose parameters must not change (`model.frozen_stages`)."""
    return encoder_record(model_config).frozen_modules(model_config.get("frozen_stages", 0))


def feature_dim(model_config) -> int:
    """Width D of the pooled feature vector of the named encoder."""
    return encoder_record(model_config).feature_dim


def abstract_encoder_variables(model_config):
    """Shapes and dtypes of the encoder's `{"params", "batch_stats"}` (`jax.eval_shape`: nothing computed)."""
    model = build_encoder(model_config)
    images = jnp.zeros((1, 64, 64, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))


def feature_map_shape(model_config, image_size: int) -> Tuple[int, int, int]:
    """(h, w, D) of the encoder's last feature map for [S, S, 3] inputs (`jax.eval_shape`: nothing runs)."""
    model = build_encoder(model_config)
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    outputs, _ = jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x, train=False), images)
    return tuple(outputs[0].shape[1:])


def check_init(init: str, model_config) -> None:
    """`ConfigError` for init='imagenet' on an encoder whose record has no ImageNet weights."""
    if init == IMAGENET and encoder_record(model_config).imagenet_weights is None:
        have = sorted(name for name, record in ENCODERS.items() if record.imagenet_weights)
        raise ConfigError(f"init='imagenet' has weights for {have}, not {model_config.name!r}; use "
                          "config.model.init='none' or the path of a torch checkpoint of that model.")


def init_checkpoint_path(init: str, model_config) -> str:
    """The file `init` names: the encoder record's ImageNet checkpoint for "imagenet" (found in a cache or
    downloaded), else `init` itself with `~` expanded. Raises `ConfigError` for "imagenet" on an encoder
    without ImageNet weights."""
    if init == IMAGENET:
        check_init(init, model_config)
        return encoder_record(model_config).imagenet_weights()
    return os.path.expanduser(init)


def import_init(init: str, model_config, cache_dir: Optional[str] = None, *, method: str = "",
                method_branches=(), with_data: bool = True):
    """({"encoder": {"params", "batch_stats"}, "branches": {method: {subtree: variables}}}, summary line)
    of `init` ("imagenet" or a checkpoint path: torch.save or .safetensors, plain or wrapped as
    `checkpoint_import.py` describes), checked against the encoder `model_config` builds; `with_data=False`
    reads names and shapes only (leaves are `pretrained.TensorSpec`s). `model_config.init_prefix` ('' =
    automatic) names the encoder's prefix. Raises `MissingFileError` or `pretrained.CheckpointError` (one line).
    """
    from fgpair_jax import checkpoint_import  # imports pretrained only; kept local to keep this registry light

    path = init_checkpoint_path(init, model_config)
    expected = checkpoint_import.expected_shapes(abstract_encoder_variables(model_config))
    return checkpoint_import.import_encoder(
        path, expected, what=f"checkpoint {os.path.basename(path)!r} for {model_config.name}",
        prefix=model_config.get("init_prefix", ""), method_branches=method_branches, method=method,
        cache_dir=cache_dir, with_data=with_data)


def load_pretrained(init: str, model_config, cache_dir: Optional[str]) -> dict:
    """Encoder variables `{"params", "batch_stats"}` for `init` = "imagenet" or a checkpoint path.

    "imagenet" reads the encoder record's `imagenet_weights`; a path may be any checkpoint `import_init`
    reads (the encoder found inside MoCo/LCR/DDP/SSL-library wrappers). The variables are checked against
    the encoder `model_config` builds (every key and shape, classifier aside; `pretrained.CheckpointError`
    on a mismatch); the checkpoint's classifier, if any, is kept under params/fc for checking logits.
    Raises `ConfigError` for "imagenet" on an encoder without ImageNet weights.
    """
    variables = import_init(init, model_config, cache_dir)[0]["encoder"]
    pretrained.check_layout(abstract_encoder_variables(model_config), pretrained.without_classifier(variables),
                            f"checkpoint {os.path.basename(init)!r} for {model_config.name}")
    return variables
