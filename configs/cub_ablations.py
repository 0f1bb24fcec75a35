"""Ablations of fgpair on CUB: which dimensions are perturbed.

    --config=configs/cub_ablations.py:ARM[,quick]
ARM: both (the method), variance (low-variance dims only), gradcam (low Grad-CAM importance only),
random (as many random dims as 'both' picks, step by step), none (no perturbation: the pair differs
only in its batch-norm group). ',quick' starts from the CPU-sized quick config instead of the paper's.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cub  # noqa: E402

ARMS = ("both", "variance", "gradcam", "random", "none")


def get_config(arg: str = "both"):
    arm, _, variant = (arg or "both").partition(",")
    if arm not in ARMS:
        raise ValueError(f"configs/cub_ablations.py takes one of {ARMS} (optionally ',quick'), not {arg!r}.")
    config = cub.get_config(variant)
    config.method = "fgpair"
    config.fgpair.criterion = arm
    return config
