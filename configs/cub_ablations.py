"""Ablations of fgpair on CUB: which dimensions are perturbed.

    --config=configs/cub_ablations.py:ARM[,quick]
ARM: both (the method), variance (low-variance dims only), gradcam (low Grad-CAM importance only),
random (as many random dims as 'both' picks, step by step), none (no perturbation: the pair differs
only in its batch-norm group). ',quick' starts from the CPU-sized quick config instead of the paper's.
"""
import importlib.util
import os

from fgpair_jax.synthesis import CRITERIA


def _base_configs():
    """configs/cub.py beside this file, loaded by path (config files are not a package; no sys.path edit)."""
    spec = importlib.util.spec_from_file_location("cub_config", os.path.join(os.path.dirname(__file__), "cub.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = "both"):
    arm, _, variant = (arg or "both").partition(",")
    if arm not in CRITERIA:
        raise ValueError(f"configs/cub_ablations.py takes one of {CRITERIA} (optionally ',quick'), not {arg!r}.")
    config = _base_configs().get_config(variant)
    config.method = "fgpair"
    config.fgpair.criterion = arm
    return config
