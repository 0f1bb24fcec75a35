"""A run's config: checked before anything is built, saved as `<workdir>/config.json`, read back and
migrated, and compared with the config a checkpoint was trained under.

- `validate`: every name (method, encoder, data set) and value range, one `ConfigError` line naming
  the key, before any data is built or any weight is loaded.
- `resolved`: paths made absolute, so `config.json` works from any directory.
- `save` / `load`: `config.json`; `load` fills keys the saved config predates (`migrate`).
- `training_fingerprint`: the keys a resumed run must not change (everything that defines what and
  how it trains: the schedule, the method, the data), so `config.json` always describes what trained;
  `first_change` compares two of them (a checkpoint's, a finished run's record in `experiments.py`).
- `override`: dotted-key overrides (`{"fgpair.sigma": 2.0}`), ml_collections' own.
"""
import json
import os
from typing import Any, Dict, Optional, Tuple

import jax
import ml_collections

from fgpair_jax import numerics
from fgpair_jax.data import aircraft, images, nuisance, resize, sources as data_sources, splits
from fgpair_jax.errors import ConfigError, MissingFileError
from fgpair_jax.evaluation.linear_probe import GRID_BEFORE_ZERO_WAS_DROPPED
from fgpair_jax.methods import BASELINE, METHODS, config_sections, get_method
from fgpair_jax.models import check_init, compute_dtype, frozen_modules
from fgpair_jax.models.conv import CONV_IMPLS
from fgpair_jax.models.efficientnet_lite import DEPTHWISE_IMPLS

CONFIG_FILE = "config.json"

# Keys added after runs were first saved, with the value that reproduces what those runs did (not
# today's default), so that older workdirs re-evaluate and resume unchanged.
KEYS_ADDED_SINCE = {
    "data.eval_split": "test",
    "data.val_fraction": 0.1,
    "data.eval_crop_fraction": 0.875,
    "optim.encoder_lr_scale": 1.0,
    "eval.probe_weight_decays": GRID_BEFORE_ZERO_WAS_DROPPED,
    "eval.recompute_bn_stats": False,
    "model.keep_bn_stats": False,
    "model.dtype": "float32",
    "model.frozen_stages": 0,
    "model.depthwise_impl": "auto",
    "fgpair.pair_mode": "decoded",
    "fgpair.decode_from": "pooled",
    "data.max_image_pixels": None,
    "eval.figures": True,
    "fgpair.log_gradient_share": False,
    # Runs before LCR was ported exactly (1x1 conv D -> 1, softmax over positions): 0 marks them, and
    # `methods/lcr.py` refuses to resume or evaluate such an lcr run in one line.
    "moco.head": "mlp",
    "nuisance.kind": "none",
    "nuisance.views": "shared",
    "nuisance.crop_fraction": 0.75,
    "nuisance.tiles": 4,
    "nuisance.tint_std": 0.1,
    "lcr.nu": 0.01,
    "lcr.attention_channels": 0,
    "lcr.eval_minmax": "batch",
    "data.download": False,
    "data.crop_to_box": False,
    "data.aircraft_train_split": "trainval",
    "data.aircraft_remove_banner": False,
    # Issue 24: negative-free methods. Runs before it were MoCo-based, which none of these keys changes.
    "fgpair.base": BASELINE,  # MoCo v2: the only base fgpair had
    "simsiam.dim": 0,
    "simsiam.pred_dim": 0,
    "simsiam.hidden_dim": 0,
    "simsiam.fix_pred_lr": True,
    "byol.base_momentum": 0.996,
    "byol.dim": 256,
    "byol.hidden_dim": 0,
    "model.init_prefix": "",  # before it, only plain state dicts (or under state_dict / model) loaded
    # Issue 27: the host pipeline's options; runs before them resampled with PIL from images as stored.
    "data.view_resize": "pil",
    "data.stored_short_side": 0,
    "data.reduced_decode": False,
    "data.cache_gib": 0.0,
    # Issue 27: a cached program computes what a fresh compile does, so older runs get the cache too.
    "compilation_cache_dir": "auto",
    # Issue 27: runs before the im2col convolution used XLA's everywhere.
    "model.conv_impl": "xla",
}

# Keys a resumed run may change: evaluation, logging, checkpoint cadence, where files are (data, compiled
# programs), and how an op is implemented (same numbers; the batches do not depend on data.worker_count:
# data/pipeline.py).
# Every other key defines what trains and must stay as it was.
MAY_CHANGE_ON_RESUME = ("eval.", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "on_nonfinite",
                        "data.manual_dir", "data.download", "data.data_dir", "data.eval_crop_fraction", "data.worker_count",
                        "data.cache_gib",
                        "model.depthwise_impl", "model.conv_impl",
                        "fgpair.log_gradient_share", "compilation_cache_dir")


def override(config: ml_collections.ConfigDict, dotted: Dict[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` with `{"a.b": value}` overrides applied (an unknown key raises KeyError)."""
    config = config.copy_and_resolve_references()
    config.update_from_flattened_dict(dotted)
    return config


def flatten(config) -> Dict[str, Any]:
    """{"a.b": value} of every leaf, values as JSON gives them back (tuples become lists)."""
    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    plain = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else config
    return dict(walk(plain, ""))


def migrate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the keys it predates (`KEYS_ADDED_SINCE`) set to what runs did before them."""
    present = flatten(config)
    missing = {key: value for key, value in KEYS_ADDED_SINCE.items() if key not in present}
    for dotted, value in missing.items():
        *parents, leaf = dotted.split(".")
        node = config
        for parent in parents:
            if parent not in node:  # a block added since, e.g. `nuisance`
                node[parent] = ml_collections.ConfigDict()
            node = node[parent]
        node[leaf] = value
    return config


def user_path(path: str) -> str:
    """`path` with a leading `~` expanded and made absolute, as a shell would have given it; '' stays ''
    (so that "does not exist" names what the user gave, not the working directory). A quoted or
    `--flag=~/x` path reaches us unexpanded, and would otherwise become a folder named `~` here."""
    return os.path.abspath(os.path.expanduser(path)) if path else path


def resolved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy with `data.manual_dir` and `data.data_dir` absolute and `~` expanded (`user_path`): a run
    may be evaluated from elsewhere."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.manual_dir = user_path(config.data.manual_dir)
        config.data.data_dir = user_path(config.data.data_dir)
    return config


def changed_training_keys(saved, given) -> list:
    """The keys that define training (`training_fingerprint`) whose values differ between two configs."""
    before, after = training_fingerprint(saved), training_fingerprint(given)
    return [key for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]


def with_evaluation_overrides(saved, given):
    """`given` (the saved config of a finished run with `--config.` overrides applied), resolved, when
    the overrides touch only what may change after training (`MAY_CHANGE_ON_RESUME`: evaluation knobs,
    data paths, logging); `ConfigError` naming the first key that would change what was trained."""
    changed = changed_training_keys(saved, given)
    if changed:
        key = changed[0]
        raise ConfigError(f"config.{key} defines what this run trained and cannot change at evaluation; "
                          f"evaluate accepts overrides of {', '.join(MAY_CHANGE_ON_RESUME)} only.")
    validate(given)
    return resolved(given)


def save(config, workdir: str) -> None:
    """`<workdir>/config.json` (process 0): what `fgpair_jax.evaluate` and later tools rebuild the run from."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def load(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run saved in `<workdir>/config.json`, migrated; `MissingFileError` if absent."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise MissingFileError(f"{path} not found: --workdir must be a directory written by "
                               "`python -m fgpair_jax.main`.")
    with open(path) as f:
        return migrate(ml_collections.ConfigDict(json.load(f)))


def training_fingerprint(config) -> Dict[str, Any]:
    """{"a.b": value} of every key that defines what a run trains: all but `MAY_CHANGE_ON_RESUME` and the
    sections of methods the run does not use (`methods.config_sections`: a moco run ignores `lcr.*`)."""
    flat = flatten(config)
    unused = set(METHODS) - config_sections(flat)
    return {key: value for key, value in flat.items()
            if key.split(".", 1)[0] not in unused
            and not any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE_ON_RESUME)}


def first_change(saved: Dict[str, Any], now: Dict[str, Any]) -> Optional[Tuple[str, Any, Any]]:
    """(key, saved value, value now) of the first training key whose value differs between two
    `training_fingerprint`s, or None when they agree.

    A run written before a key existed ran with the value `KEYS_ADDED_SINCE` gives it, so that value
    stands in for it; an empty `saved` (checkpoints from before training configs were recorded)
    compares nothing. Keys only `saved` has (since removed) are skipped.
    """
    if saved:
        added = json.loads(json.dumps(KEYS_ADDED_SINCE))  # as JSON gives values back: tuples become lists
        saved = {**{key: value for key, value in added.items() if key in now}, **saved}
    for key in sorted(set(saved) & set(now)):
        if saved[key] != now[key]:
            return key, saved[key], now[key]
    return None


def describe_change(saved: Dict[str, Any], now: Dict[str, Any]) -> Optional[str]:
    """`first_change` of a checkpoint's fingerprint and the config now, in words (None when they agree)."""
    change = first_change(saved, now)
    if change is None:
        return None
    key, was, is_now = change
    return (f"config.{key} is {was!r} in the checkpoint but {is_now!r} now (a resumed run keeps "
            f"the training config it started with: set it back to {was!r} to resume)")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config) -> None:
    """Raise `ConfigError` (one line naming the key and the fix) for a config that cannot run.

    Checks names against the registries (method, encoder, data set), value ranges, and the method's own
    knobs (`Method.validate`). Runs before any data is built or weight loaded.
    """
    get_method(config.method).validate(config)
    compute_dtype(config.model)
    frozen_modules(config.model)  # the encoder name, and frozen_stages out of its range
    check_init(config.model.init, config.model)
    _check(config.model.depthwise_impl in DEPTHWISE_IMPLS,
           f"config.model.depthwise_impl={config.model.depthwise_impl!r}: use one of {DEPTHWISE_IMPLS}.")
    _check(config.model.conv_impl in CONV_IMPLS,
           f"config.model.conv_impl={config.model.conv_impl!r}: use one of {CONV_IMPLS}.")
    _check(config.model.bn_groups >= 1 and config.global_batch_size % config.model.bn_groups == 0,
           f"config.model.bn_groups={config.model.bn_groups} must divide config.global_batch_size="
           f"{config.global_batch_size} (each batch-norm group normalises its own slice).")
    data_sources.check_name(config.data.name)
    nuisance.validate(nuisance.Nuisance.of_config(config))
    splits.check_eval_split(config.data.eval_split, config.data.val_fraction)
    numerics.check_policy(config.on_nonfinite)
    _check(config.optim.name == "sgd", f"config.optim.name={config.optim.name!r} is not supported; use 'sgd'.")
    _check(config.num_epochs >= 0, f"config.num_epochs={config.num_epochs} must be >= 0.")
    _check(config.global_batch_size >= 1, f"config.global_batch_size={config.global_batch_size} must be >= 1.")
    _check(0 <= config.seed < 2**32, f"config.seed={config.seed} must lie in [0, 2**32).")
    _check(config.data.image_size >= 16, f"config.data.image_size={config.data.image_size} must be >= 16 pixels.")
    for key in ("crop_scale_min", "eval_crop_fraction"):
        _check(0.0 < config.data[key] <= 1.0, f"config.data.{key}={config.data[key]} must lie in (0, 1].")
    _check(config.data.worker_count >= -1, f"config.data.worker_count={config.data.worker_count} must be >= 0, "
           "or -1 for one per core on a GPU/TPU and none on a CPU.")
    images.check_max_image_pixels(config.data.max_image_pixels)
    images.check_stored_short_side(config.data.stored_short_side, config.data.image_size)
    resize.check_view_resize(config.data.view_resize)
    _check(config.data.cache_gib >= 0, f"config.data.cache_gib={config.data.cache_gib} must be >= 0 (0: no cache).")
    aircraft.train_split(config.data)  # ConfigError for another value than trainval | train
    _check(not config.data.aircraft_remove_banner or config.data.name == "aircraft",
           f"config.data.aircraft_remove_banner=True is for FGVC-Aircraft's copyright banner, not "
           f"{config.data.name!r}; set it to False.")
    for key in ("jitter_prob", "grayscale_prob", "blur_prob"):
        _check(0.0 <= config.augment[key] <= 1.0, f"config.augment.{key}={config.augment[key]} must lie in [0, 1].")
    _check(0.0 <= config.augment.hue <= 0.5, f"config.augment.hue={config.augment.hue} must lie in [0, 0.5] "
           "(a shift of the hue circle; torchvision's ColorJitter bound).")
    for key in ("learning_rate", "weight_decay", "warmup_epochs", "encoder_lr_scale"):
        _check(config.optim[key] >= 0, f"config.optim.{key}={config.optim[key]} must be >= 0.")
    _check(0.0 <= config.optim.momentum < 1.0, f"config.optim.momentum={config.optim.momentum} must lie in [0, 1).")
    e = config.eval
    _check(e.batch_size >= 1 and e.knn_k >= 1 and e.knn_every_epochs >= 0,
           f"config.eval: batch_size={e.batch_size} and knn_k={e.knn_k} must be >= 1, knn_every_epochs >= 0.")
    _check(e.knn_temperature > 0, f"config.eval.knn_temperature={e.knn_temperature} must be > 0.")
    _check(0.0 < e.probe_val_fraction < 1.0, f"config.eval.probe_val_fraction={e.probe_val_fraction} must lie in (0, 1).")
    _check(len(e.probe_weight_decays) > 0 and min(e.probe_weight_decays) >= 0,
           f"config.eval.probe_weight_decays={tuple(e.probe_weight_decays)} must be non-empty and >= 0.")
    _check(config.log_every_steps >= 1 and config.checkpoint_every_steps >= 1,
           f"config.log_every_steps={config.log_every_steps} and config.checkpoint_every_steps="
           f"{config.checkpoint_every_steps} must be >= 1.")
