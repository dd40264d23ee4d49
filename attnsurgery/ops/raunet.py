"""RAU-Net feature resizing (HiDiffusion): resolution-aware down/upsampling and block pool/unpool.

Pure tensor functions plus the size arithmetic needed to predict the U-Net's skip sizes while
RAU-Net is active (so ControlNet residuals can be resized before the U-Net adds them).
Shapes: features `[batch, channels, height, width]`; sizes `(height, width)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "RAD_DILATION",
    "RAD_PADDING",
    "RAD_STRIDE",
    "DownBlockShape",
    "conv_output_size",
    "down_path_sizes",
    "pool_features",
    "pooled_size",
    "resize_features",
    "resolution_aware_downsample",
]

# RAD: the 3x3 stride-2 downsampler's own weights, dilated and strided to reduce 4x instead of 2x
# (HiDiffusion, Sec. 3.2): output side = ceil(side / 4).
RAD_STRIDE = 4
RAD_PADDING = 2
RAD_DILATION = 2


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output length of a convolution along one axis (PyTorch's formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def resolution_aware_downsample(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """RAD: run a stride-2 downsampler's 3x3 weights with stride 4, padding 2, dilation 2.

    Args:
        features: `[batch, in_channels, height, width]`.
        weight: `[out_channels, in_channels, 3, 3]`, the downsampler conv's weight.
        bias: `[out_channels]` or None.

    Returns:
        `[batch, out_channels, ceil(height / 4), ceil(width / 4)]`.
    """
    if weight.shape[-2:] != (3, 3):
        raise ValueError(
            f"RAD expects the U-Net's 3x3 downsampler conv, got a {tuple(weight.shape[-2:])} kernel; "
            "disable RAU-Net (raunet=False) for this model."
        )
    return F.conv2d(features, weight, bias, stride=RAD_STRIDE, padding=RAD_PADDING, dilation=RAD_DILATION)


def pooled_size(size: tuple[int, int]) -> tuple[int, int]:
    """Size after `pool_features`: each side halved, rounded up."""
    return -(-size[0] // 2), -(-size[1] // 2)


def pool_features(features: torch.Tensor) -> torch.Tensor:
    """The cross-attention block's pool: 2x2 average, ceil mode (odd sides keep their last row/column)."""
    return F.avg_pool2d(features, kernel_size=2, ceil_mode=True)


def resize_features(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize to `size`; used to unpool and to fit ControlNet residuals to RAU-Net's features."""
    if tuple(features.shape[-2:]) == tuple(size):
        return features
    return F.interpolate(features, size=tuple(size), mode="bicubic")


@dataclass(frozen=True)
class DownBlockShape:
    """What one U-Net down block does to the feature size.

    Args:
        num_layers: (resnet[, attention]) pairs; each saves one skip at the current size.
        downsample: The downsampler conv's (kernel, stride, padding), or None for the last block.
    """

    num_layers: int
    downsample: tuple[int, int, int] | None


def down_path_sizes(
    latent: tuple[int, int],
    blocks: Sequence[DownBlockShape],
    rad_blocks: frozenset[int] = frozenset(),
    pooled_blocks: frozenset[int] = frozenset(),
) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Skip sizes the U-Net's down path saves, in order, and the size entering the mid block.

    Mirrors `UNet2DConditionModel`: conv_in saves one skip, each pair saves one, each downsampler
    saves one. A block in `pooled_blocks` pools after its first pair (its first skip is pooled);
    a block in `rad_blocks` downsamples 4x.

    Example:
        >>> down_path_sizes((64, 64), [DownBlockShape(2, (3, 2, 1)), DownBlockShape(2, None)], {0})[1]
        (16, 16)
    """
    size = tuple(latent)
    skips = [size]
    for index, block in enumerate(blocks):
        for layer in range(block.num_layers):
            if layer == 0 and index in pooled_blocks:
                size = pooled_size(size)
            skips.append(size)
        if block.downsample is not None:
            if index in rad_blocks:
                kernel, stride, padding, dilation = 3, RAD_STRIDE, RAD_PADDING, RAD_DILATION
            else:
                (kernel, stride, padding), dilation = block.downsample, 1
            size = tuple(conv_output_size(side, kernel, stride, padding, dilation) for side in size)
            skips.append(size)
    return skips, size
