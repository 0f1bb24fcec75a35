"""How alike two runs' representations are: linear CKA between feature matrices of the same images.

Why: when two methods score within noise of each other, the next question is whether training moved
the features at all. Linear CKA (Kornblith et al., 2019) compares representations up to rotation and
isotropic scale: 1 for the same features, near 0 for unrelated ones.
"""
import numpy as np


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) for [N, Dx] and [N, Dy] features of the same N
    images (Xc, Yc: column-centred), computed in float64."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs [N, D] features of the same N images; got {x.shape} and {y.shape}.")
    x = np.asarray(x, np.float64) - np.mean(x, axis=0, dtype=np.float64)
    y = np.asarray(y, np.float64) - np.mean(y, axis=0, dtype=np.float64)
    cross = np.linalg.norm(y.T @ x) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):  # constant features: NaN, left to the caller
        return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))
