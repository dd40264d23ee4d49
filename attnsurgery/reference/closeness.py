"""How close a plugin's image stays to the plain pipeline's image at the same prompt, seed and size.

Fidelity says whether an image is right; closeness says how much a plugin changed it, which is what a
training-free speed-up promises to keep small. PSNR over 8-bit RGB, and SSIM (Wang, Bovik, Sheikh and
Simoncelli 2004, "Image quality assessment: from error visibility to structural similarity": an 11 x 11
Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, per channel, averaged), both of the paper's
standard settings.

Example:
    >>> a = np.zeros((16, 16, 3), dtype=np.uint8)
    >>> psnr(a, a), ssim(a, a)
    (inf, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from attnsurgery.reference.evaluator import as_rgb_array

__all__ = ["psnr", "ssim", "mean_closeness"]

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
PEAK = 255.0


def _as_float(image: np.ndarray) -> np.ndarray:
    """0..255 float64, quantised to 8 bits as a saved image would be (pipelines' "np" output is [0, 1])."""
    return np.round(as_rgb_array(image)).astype(np.float64)


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"closeness compares two [H, W, C] images of one size, got {a.shape} and {b.shape}")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two RGB images (uint8, or floats in [0, 1]); inf when equal."""
    x, y = _as_float(a), _as_float(b)
    _check_pair(x, y)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(PEAK**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two RGB images (1.0 when equal), windows inside the image only."""
    x, y = _as_float(a), _as_float(b)
    _check_pair(x, y)
    if min(x.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} px a side, got {x.shape[:2]}")
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(x.shape[2], 1, -1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=x.shape[2])

    tx, ty = (torch.from_numpy(v).permute(2, 0, 1)[None] for v in (x, y))
    mx, my = blur(tx), blur(ty)
    vx, vy, cov = blur(tx * tx) - mx**2, blur(ty * ty) - my**2, blur(tx * ty) - mx * my
    c1, c2 = (SSIM_K1 * PEAK) ** 2, (SSIM_K2 * PEAK) ** 2
    index = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(index.mean())


def mean_closeness(images: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> tuple[float, float]:
    """(mean PSNR, mean SSIM) of ``images`` to ``references``, pair by pair (PSNR is inf if all are equal)."""
    if len(images) != len(references) or not images:
        raise ValueError(f"closeness needs as many images as references (> 0), got {len(images)}, {len(references)}")
    return (
        float(np.mean([psnr(a, b) for a, b in zip(images, references, strict=True)])),
        float(np.mean([ssim(a, b) for a, b in zip(images, references, strict=True)])),
    )
