"""A controlled nuisance for the mechanism control of the test bed: content every view of an image
shares but that says nothing about its class.

The premise of fgpair (and of feature-suppression work: Chen, Luo, Li, "Intriguing properties of
contrastive losses", NeurIPS 2021) is that instance discrimination latches on to whatever the two views
of an image share, discriminative for the class or not. Here that is made explicit and measurable:

- `kind='panel'`: each view is shrunk to `crop_fraction` of its side and pasted in the middle of a
  panel of `tiles` x `tiles` random colour tiles, and the whole view is shifted by a random RGB tint
  (std `tint_std`, in [0, 1] pixel units). The panel and tint are drawn per *image*: both views of an
  image, in every epoch, carry the same ones, so they are an easy shortcut for matching views and pure
  noise for the class. Evaluation images carry their own, drawn the same way.
- `views='resampled'` is the oracle augmentation: a new panel and tint for every view, so the nuisance
  no longer matches across views and the shortcut is gone (background augmentation: Ryali, Schwab,
  Morcos, "Characterizing and improving the robustness of self-supervised learning through background
  augmentations", 2021). Evaluation images are unchanged by this knob.

Expected: moco drops with the nuisance and the oracle recovers most of it. The question for fgpair is
whether it recovers any of it without being told.

Applied on the host after the random resized crop and flip (`pipeline.py`), before the photometric
augmentation on the device, which therefore jitters the panel too.
"""
import dataclasses

import numpy as np
from PIL import Image

from fgpair_jax.errors import ConfigError

KINDS = ("none", "panel")
VIEWS = ("shared", "resampled")
# The nuisance belongs to the image, not to the run: one fixed seed, so every arm and seed of an
# experiment sees the same nuisance on the same image.
NUISANCE_SEED = 20241
TRAIN_STREAM, EVAL_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class Nuisance:
    """`config.nuisance` as a value (picklable: grain workers get it)."""

    kind: str = "none"
    views: str = "shared"
    crop_fraction: float = 0.75
    tiles: int = 4
    tint_std: float = 0.1

    @classmethod
    def of_config(cls, config) -> "Nuisance":
        """The `config.nuisance` block; a config without one (saved before it existed) has none."""
        block = config.get("nuisance")
        return cls() if block is None else cls(**{field.name: block[field.name] for field in dataclasses.fields(cls)})

    @property
    def active(self) -> bool:
        return self.kind != "none"


def validate(nuisance: Nuisance) -> None:
    """`ConfigError` (one line naming the key) for a nuisance knob out of range."""
    if nuisance.kind not in KINDS:
        raise ConfigError(f"config.nuisance.kind={nuisance.kind!r}; choose one of {list(KINDS)}.")
    if nuisance.views not in VIEWS:
        raise ConfigError(f"config.nuisance.views={nuisance.views!r}; choose one of {list(VIEWS)} (resampled: "
                          "the oracle augmentation).")
    if not 0.0 < nuisance.crop_fraction <= 1.0:
        raise ConfigError(f"config.nuisance.crop_fraction={nuisance.crop_fraction} must lie in (0, 1].")
    if nuisance.tiles < 1:
        raise ConfigError(f"config.nuisance.tiles={nuisance.tiles} must be >= 1.")
    if nuisance.tint_std < 0:
        raise ConfigError(f"config.nuisance.tint_std={nuisance.tint_std} must be >= 0.")


def stream_of(split: str) -> int:
    """The nuisance stream of a split's images: "train" (the images SSL trains on, with the nuisance they
    carried in training) or "test" (the evaluated ones)."""
    return {"train": TRAIN_STREAM, "test": EVAL_STREAM}[split]


def image_rng(stream: int, record: int) -> np.random.Generator:
    """The generator of one image's own nuisance (`stream`: TRAIN_STREAM or EVAL_STREAM, `record`: its index)."""
    return np.random.default_rng((NUISANCE_SEED, stream, record))


def draw(rng: np.random.Generator, size: int, nuisance: Nuisance):
    """(panel uint8 [size, size, 3], tint float32 [3]): `tiles` x `tiles` uniform random colours,
    nearest-upsampled to the side, and a Gaussian RGB offset in [0, 1] units."""
    tiles = rng.integers(0, 256, (nuisance.tiles, nuisance.tiles, 3), dtype=np.uint8)
    panel = np.asarray(Image.fromarray(tiles).resize((size, size), Image.Resampling.NEAREST))
    tint = (rng.normal(0.0, nuisance.tint_std, 3)).astype(np.float32)
    return panel, tint


def apply(view: np.ndarray, panel: np.ndarray, tint: np.ndarray, crop_fraction: float) -> np.ndarray:
    """uint8 [S, S, 3] view -> the view shrunk to round(crop_fraction * S), centred on `panel`, plus `tint`."""
    size = view.shape[0]
    inner = max(1, int(round(crop_fraction * size)))
    out = panel.copy()
    if inner < size:
        shrunk = np.asarray(Image.fromarray(view).resize((inner, inner), Image.Resampling.BILINEAR))
        start = (size - inner) // 2
        out[start:start + inner, start:start + inner] = shrunk
    else:
        out = view.copy()
    return np.clip(out.astype(np.float32) + 255.0 * tint, 0, 255).round().astype(np.uint8)


def two_views(view1: np.ndarray, view2: np.ndarray, record: int, view_rng: np.random.Generator,
              nuisance: Nuisance):
    """The nuisance on both training views of image `record`: the image's own (`shared`) or one drawn
    per view from `view_rng` (`resampled`, the oracle)."""
    if not nuisance.active:
        return view1, view2
    size = view1.shape[0]
    if nuisance.views == "shared":
        panel, tint = draw(image_rng(TRAIN_STREAM, record), size, nuisance)
        first = second = (panel, tint)
    else:
        first, second = draw(view_rng, size, nuisance), draw(view_rng, size, nuisance)
    return (apply(view1, *first, nuisance.crop_fraction), apply(view2, *second, nuisance.crop_fraction))


def eval_image(image: np.ndarray, record: int, nuisance: Nuisance, stream: int = EVAL_STREAM) -> np.ndarray:
    """The nuisance on an evaluation image: always its own (the oracle changes training only)."""
    if not nuisance.active:
        return image
    panel, tint = draw(image_rng(stream, record), image.shape[0], nuisance)
    return apply(image, panel, tint, nuisance.crop_fraction)
