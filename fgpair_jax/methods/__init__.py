"""Registry of self-supervised methods, chosen by `config.method`, and the interface they implement.

A method is a module implementing `Method` (structurally: module-level names). Everything that is
specific to one method lives in its module: its loss, its own state (a queue, a momentum encoder and
its schedule, a variance EMA: created, updated and checkpointed as `TrainState.method_state`), its
evaluation features, optimisers of its own parameters, what its figures show, its config checks and
its ablation arms. Nothing outside `methods/` names a method. Adding one is a module plus an entry
in `METHODS`.
"""
from typing import Any, Dict, List, Mapping, Optional, Protocol, Tuple

import jax
import optax

from fgpair_jax.errors import ConfigError
from fgpair_jax.methods import byol, fgpair, lcr, moco, simsiam


class Method(Protocol):
    """What `step.py`, `state.py`, `optim.py`, `evaluate.py`, `viz.py` and `experiments.py` use of a method."""

    ABLATIONS: Mapping[str, Mapping[str, Any]]  # experiment arm -> config overrides (dotted keys)
    # params subtree -> {module of another project's checkpoint beside its encoder: flax module of the
    # subtree}, loaded with `config.model.init` (LCR's conv16/bn16 -> attention/conv, bn); {} if none
    CHECKPOINT_BRANCHES: Mapping[str, Mapping[str, str]]

    def init_variables(self, rng: jax.Array, config) -> dict:
        """Fresh {'params': {...}, 'batch_stats': {...}} (params['encoder'] is the encoder)."""

    def state_sizes(self, config, num_train_examples: Optional[int]) -> Dict[str, int]:
        """The sizes the method's own state takes from the data (MoCo: {'queue_size': K}; {} if none);
        `num_train_examples` None when the data is not known. Raises `ConfigError` for sizes that cannot work."""

    def init_state(self, rng: jax.Array, variables: dict, config, sizes: Dict[str, int]) -> dict:
        """The method's own state at step 0 (`TrainState.method_state`): a dict of arrays, {} if none."""

    def update_state(self, method_state: dict, params, aux: dict, config, *, step: jax.Array,
                     total_steps: int) -> dict:
        """The method state after an optimiser step: `params` are the updated ones, `aux` the loss's,
        `step` the int32 step before this update, `total_steps` the run's (for momentum schedules)."""

    def data_warnings(self, config, num_train_examples: int) -> List[str]:
        """One-line warnings about the method's own sizes for a train split of `num_train_examples`."""

    def loss(self, params, state, view1, view2, rng, config, *, epoch) -> Tuple[jax.Array, dict]:
        """(scalar loss, aux): aux holds 'batch_stats', 'metrics' (dict of scalars, 'loss' among them),
        what the method's `update_state` and `term_gradients` read (MoCo: 'keys', 'ema_batch_stats');
        `epoch` is the fractional training progress."""

    def term_gradients(self, params, state, aux: dict, config) -> dict:
        """{term: gradient of that weighted loss term restricted to some params subtrees} ({} for a method
        with one loss term), for the step's `aux` (`loss`'s) at `params`; logged as `grad_share_<term>` by
        `step.gradient_shares`, computed on logged steps only (a diagnostic: one more backward pass)."""

    def eval_features(self, params, batch_stats, images, config, valid=None) -> jax.Array:
        """[B, D] float features of the frozen encoder for normalised [B, S, S, 3] images; `valid` (bool [B]
        or None = all) marks the rows that are real images, not an evaluation batch's padding."""

    def optimizer_partitions(self, config) -> Dict[str, optax.GradientTransformation]:
        """Top-level params subtrees trained by an optimiser of their own ({} if none)."""

    def figure_arrays(self, state, images, rng, config) -> dict:
        """What the figures show for normalised [B, S, S, 3] images: 'cam' [B, S, S] in [0, 1]; a method
        that synthesizes pairs adds 'pair_a' / 'pair_b' [B, S, S, 3] (normalised), 'pair_titles' (two
        strings: what each image is), 'pair_variant' (a string: how the pairs were made, the figure's title),
        'pair_contrast_each' ([B] floats: how much each pair's two images differ, a note beside each row) and
        'diagnostics' ({name: float}, written to diagnostics.json)."""

    def label(self, config) -> str:
        """What trained, as figure titles name it: 'moco', 'fgpair (base simsiam)'."""

    def loss_schedule(self, config) -> dict:
        """What loss_curves.png says of the logged total (`figures.losses`): 'formula' (str: what the total
        is, with the config's weights); a method with a loss weight that switches on during training adds
        'phases' ((epoch its warm-up ends, epoch its ramp reaches full weight), floats, equal without a
        ramp) and 'weight' (a function of float epochs [N] -> that weight at each, a numpy array [N])."""

    def config_sections(self, flat: Dict[str, Any]) -> set:
        """The config sections named after methods that this method reads ({'moco'} for moco, {'lcr', 'moco'}
        for lcr), of a `run_config.flatten`ed config: the rest do not define what it trains."""

    def validate(self, config) -> None:
        """Raise `ConfigError` (one line naming the key) for a value of this method's knobs out of range."""

    # Optional, for methods whose state had the pre-issue-24 layout (moco, lcr, fgpair on moco):
    # `has_legacy_layout(config) -> bool`, `to_legacy_fields(method_state) -> dict` of
    # `state.LEGACY_METHOD_FIELDS` and `from_legacy_fields(fields) -> method_state` (`state.legacy_layout`).

    def preflight_warnings(self, config, feature_map_shape: Tuple[int, int, int]) -> list:
        """One-line warnings (strings) about `config` that need the encoder's last feature map (h, w, D) at
        the run's image size, e.g. a spatial loss that a 1-pixel-wide map makes vanish (`preflight.py`)."""


METHODS: Dict[str, Method] = {"moco": moco, "lcr": lcr, "fgpair": fgpair, "simsiam": simsiam, "byol": byol}
BASELINE = "moco"  # the method every gain is measured against (experiments.py)
# (reference arm, the arm compared with it): the pairs of arms the comparison's side-by-side figures
# draw, the first pair that both finished a common seed (`figures.embedding.compared_runs`).
COMPARED_ARMS: Tuple[Tuple[str, str], ...] = fgpair.COMPARED_ARMS


def get_method(name: str) -> Method:
    """The method registered as `name`, or a one-line `ConfigError` listing the choices."""
    if name not in METHODS:
        raise ConfigError(f"Unknown config.method={name!r}; choose one of {sorted(METHODS)}.")
    return METHODS[name]


def config_sections(flat: Dict[str, Any]) -> set:
    """The config sections (named after the methods: `moco`, `lcr`, ...) that the method of `flat` (a
    `run_config.flatten`ed config) reads: its own and those of the methods it is built on (lcr: moco;
    fgpair: its `fgpair.base`). Every section when the method is unknown (an old or foreign record).
    `run_config.training_fingerprint` leaves the other methods' sections out: a moco run does not
    depend on `lcr.*`."""
    method = METHODS.get(flat.get("method"))
    return set(METHODS) if method is None else method.config_sections(flat)


def checkpoint_branches() -> Dict[str, Mapping[str, Mapping[str, str]]]:
    """{method: its `CHECKPOINT_BRANCHES`} of the methods that have any (what `checkpoint_import` looks
    for beside an encoder)."""
    return {name: method.CHECKPOINT_BRANCHES for name, method in METHODS.items() if method.CHECKPOINT_BRANCHES}


def experiment_arms() -> Dict[str, Dict[str, Any]]:
    """arm -> config overrides: every method under its own name, each method's ablations, and 'init'
    (the initial encoder evaluated without a single SSL step: what the SSL budget has to beat)."""
    arms = {}
    for name, method in METHODS.items():
        arms[name] = {"method": name}
        arms.update({arm: {"method": name, **overrides} for arm, overrides in method.ABLATIONS.items()})
    arms["init"] = {"method": BASELINE, "num_epochs": 0}
    return arms


def arm_of(config) -> Tuple[str, Dict[str, Any]]:
    """(arm, its overrides less the method) of `experiment_arms` that `config` runs: the arm of
    `config.method` whose overrides `config` has, the most specific one (`fgpair_simsiam` before
    `fgpair`); (config.method, {}) when no arm of the method matches. For a run's header line."""
    def value(dotted):
        node = config
        for key in dotted.split("."):
            if key not in node:
                return KeyError  # a key this config does not have: not this arm
            node = node[key]
        return node

    matching = [(arm, {key: v for key, v in overrides.items() if key != "method"})
                for arm, overrides in experiment_arms().items()
                if overrides["method"] == config.method and all(value(k) == v for k, v in overrides.items())]
    return max(matching, key=lambda match: len(match[1]), default=(config.method, {}))

