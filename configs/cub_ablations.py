"""Ablations of fgpair on CUB, under the names the comparison table gives them (`fgpair_jax.experiments`).

    --config=configs/cub_ablations.py:ARM[,VARIANT]
ARM: fgpair (the method: low-variance and low-Grad-CAM dims), variance (low-variance dims only), gradcam
(low Grad-CAM importance only), random (as many random dims as fgpair picks, step by step), none (no
perturbation: the pair differs only in its batch-norm group), fgpair_residual (a real image carrying the
rendered perturbation), fgpair_simsiam / fgpair_byol (the pairs on a negative-free base): the fgpair
arms of `fgpair_jax/methods/fgpair.py` (`ABLATIONS`). 'both', this file's former name for the method,
is still accepted with a one-line note. VARIANT: configs/cub.py's (quick, medium, scratch, tiny); none
starts from the paper's protocol.
"""
import importlib.util
import os
import sys

from fgpair_jax.methods import experiment_arms

DEFAULT_ARM = "fgpair"
RENAMED = {"both": "fgpair"}  # the method's arm was called by its criterion here


def _base_configs():
    """configs/cub.py beside this file, loaded by path (config files are not a package; no sys.path edit)."""
    spec = importlib.util.spec_from_file_location("cub_config", os.path.join(os.path.dirname(__file__), "cub.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fgpair_arms() -> dict:
    """arm -> dotted config overrides of every fgpair arm of the comparison table."""
    return {arm: overrides for arm, overrides in experiment_arms().items() if overrides["method"] == "fgpair"}


def get_config(arg: str = DEFAULT_ARM):
    """configs/cub.py's VARIANT with ARM's overrides, for `arg` = 'ARM[,VARIANT]'.

    Raises:
      ValueError: an unknown ARM or VARIANT, naming the valid ones.
    """
    arm, _, variant = (arg or DEFAULT_ARM).partition(",")
    if arm in RENAMED:
        print(f"note: configs/cub_ablations.py:{arm} is now called {RENAMED[arm]} (the comparison table's name "
              f"for the method); running {RENAMED[arm]}.", file=sys.stderr)
        arm = RENAMED[arm]
    arms, base = fgpair_arms(), _base_configs()
    variants = base._common().VARIANTS
    if arm not in arms or (variant and variant not in variants):
        raise ValueError(f"configs/cub_ablations.py takes ARM[,VARIANT], not {arg!r}: ARM one of "
                         f"{', '.join(arms)}; VARIANT one of {', '.join(variants)} "
                         f"(e.g. --config=configs/cub_ablations.py:variance,quick).")
    config = base.get_config(variant)
    config.update_from_flattened_dict(arms[arm])
    return config
