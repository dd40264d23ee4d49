"""RAU-Net resizing ops against explicit float64 references and plain size arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnsurgery.ops.raunet import (
    DownBlockShape,
    conv_output_size,
    down_path_sizes,
    pool_features,
    pooled_size,
    resize_features,
    resolution_aware_downsample,
)


def reference_rad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Output (i, j) = bias + sum over taps (a, b) of weight[:, :, a, b] @ x_padded[4i + 2a, 4j + 2b]."""
    batch, _, height, width = x.shape
    padded = F.pad(x, (2, 2, 2, 2))
    out_h, out_w = math.ceil(height / 4), math.ceil(width / 4)
    out = torch.empty(batch, weight.shape[0], out_h, out_w, dtype=x.dtype)
    for i in range(out_h):
        for j in range(out_w):
            acc = bias.expand(batch, -1).clone()
            for a in range(3):
                for b in range(3):
                    acc += padded[:, :, 4 * i + 2 * a, 4 * j + 2 * b] @ weight[:, :, a, b].T
            out[:, :, i, j] = acc
    return out


@pytest.mark.parametrize("height,width", [(8, 8), (9, 13), (16, 6), (5, 4)])
def test_rad_matches_explicit_taps(height, width):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, height, width, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    out = resolution_aware_downsample(x, weight, bias)
    assert out.shape[-2:] == (math.ceil(height / 4), math.ceil(width / 4))
    torch.testing.assert_close(out, reference_rad(x, weight, bias), rtol=1e-12, atol=1e-12)


def test_rad_rejects_other_kernels():
    with pytest.raises(ValueError, match="3x3 downsampler"):
        resolution_aware_downsample(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 1, 1), None)


@pytest.mark.parametrize("height,width", [(8, 8), (7, 5), (1, 3)])
def test_pool_is_ceil_mode_average(height, width):
    x = torch.randn(1, 2, height, width, dtype=torch.float64)
    pooled = pool_features(x)
    assert tuple(pooled.shape[-2:]) == pooled_size((height, width))
    for i in range(pooled.shape[-2]):
        for j in range(pooled.shape[-1]):
            patch = x[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
            torch.testing.assert_close(pooled[:, :, i, j], patch.mean(dim=(-2, -1)))


def test_resize_is_bicubic_and_identity_at_same_size():
    x = torch.randn(1, 2, 6, 5)
    assert resize_features(x, (6, 5)) is x
    expected = F.interpolate(x, size=(11, 9), mode="bicubic")
    assert torch.equal(resize_features(x, (11, 9)), expected)


def test_conv_output_size_matches_torch():
    for size in range(1, 20):
        for kernel, stride, padding, dilation in [(3, 2, 1, 1), (3, 4, 2, 2), (3, 1, 1, 1)]:
            conv = torch.nn.Conv2d(1, 1, kernel, stride, padding, dilation)
            expected = conv(torch.zeros(1, 1, size, size)).shape[-1]
            assert conv_output_size(size, kernel, stride, padding, dilation) == expected


def _sd15_like_blocks() -> list[DownBlockShape]:
    return [DownBlockShape(2, (3, 2, 1))] * 3 + [DownBlockShape(2, None)]


def test_down_path_sizes_plain_unet():
    skips, mid = down_path_sizes((64, 40), _sd15_like_blocks())
    assert skips == [(64, 40)] * 3 + [(32, 20)] * 3 + [(16, 10)] * 3 + [(8, 5)] * 3
    assert mid == (8, 5)


def test_down_path_sizes_with_rad_and_pool():
    skips, mid = down_path_sizes((66, 64), _sd15_like_blocks(), rad_blocks=frozenset({0}), pooled_blocks=frozenset({1}))
    # RAD: 66 -> 17 (ceil(66 / 4)); pool in block 1: 17 -> 9 after its first pair.
    assert skips[:4] == [(66, 64)] * 3 + [(17, 16)]
    assert skips[4:7] == [(9, 8), (9, 8), (5, 4)]
    assert skips[7:] == [(5, 4), (5, 4), (3, 2), (3, 2), (3, 2)]
    assert mid == (3, 2)
