"""The pyramid depthwise-convolution block that replaces self-attention (Delta-ConvFusion).

Source: "Can We Achieve Efficient Diffusion without Self-Attention? Distilling Self-Attention into
Convolutions" (ICCV 2025, arXiv 2504.21292), the Delta-ConvBlock. Pure tensor code, no diffusers.

Shapes: the block maps tokens ``[batch, tokens, channels]`` laid out row-major on a ``(height, width)``
grid (``tokens == height * width``) to tokens of the same shape.

Layout: the tokens are already channels-last (``[B, H, W, C]`` in memory), so the 1x1 projections run as
plain matmuls on the token matrix and the spatial ops (depthwise conv, pooling, bilinear upsampling) run
on a channels-last NCHW *view* of it. No layout copies; on CPU the channels-last depthwise conv is also
an order of magnitude faster than the contiguous one for large kernels (11x11 at 128^2: ~20 ms vs ~280 ms).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

Gate = Literal["mul", "div", "sigmoid"]
GATES: tuple[str, ...] = ("mul", "div", "sigmoid")

# Kernel sizes per attention-carrying block, ordered as the UNet lists its blocks (down blocks from the
# highest resolution, mid, up blocks from the lowest resolution): about 60% of the receptive field the
# paper measured for the original self-attention (arXiv 2504.21292, Sec. 4 / released configs).
KERNEL_PRESETS: dict[str, dict[str, tuple[int, ...]]] = {
    "sd15": {"down": (7, 9, 5), "mid": (3,), "up": (5, 9, 11)},
    "sdxl": {"down": (9, 7), "mid": (9,), "up": (9, 13)},
}
# SD2.x has the SD1.5 UNet topology; the SDXL inpainting UNet has the SDXL one.
_PRESET_ALIASES: dict[str, str] = {"sd2": "sd15", "sdxl-inpaint": "sdxl"}


def kernel_preset(family: str) -> dict[str, tuple[int, ...]]:
    """Per-level kernel sizes for a UNet family (``"sd15"``, ``"sd2"``, ``"sdxl"``, ``"sdxl-inpaint"``).

    Args:
        family: the family name as ``attnsurgery.families`` reports it.

    Returns:
        ``{"down": (...), "mid": (...), "up": (...)}``, one kernel size per attention-carrying block
        in the order the UNet lists them.

    Example:
        >>> kernel_preset("sd15")["up"]
        (5, 9, 11)
    """
    key = _PRESET_ALIASES.get(family, family)
    if key not in KERNEL_PRESETS:
        known = sorted([*KERNEL_PRESETS, *_PRESET_ALIASES])
        raise NotImplementedError(
            f"No ConvFusion kernel-size preset for model family {family!r} (presets exist for {known}). "
            "Pass explicit kernel sizes instead."
        )
    return dict(KERNEL_PRESETS[key])


def _pooled_size(size: int, scale: float) -> int:
    """floor(size * scale), but at least one cell so a 1-token-wide grid still works."""
    return max(1, math.floor(size * scale))


class PyramidConvBlock(nn.Module):
    """Multi-scale gated depthwise convolution: a drop-in for a transformer block's self-attention.

    Steps (C = ``channels``): 1x1 projection C -> C/2; per scale s (default 1 and 1/2): adaptive average
    pool to ``(floor(H s), floor(W s))`` when s != 1, a k x k depthwise conv without bias, split the
    channels into halves x1, x2 and gate them, bilinear upsample back to (H, W); concatenate the C/4-wide
    stage outputs and project to C (1x1); add a global-pool branch (mean over the grid -> linear C -> C).

    Gates (``gate``): ``"mul"`` = x1 * x2 * sqrt(C/4), as the released code does (default); ``"div"`` =
    x1 * x2 / sqrt(C/4), as the paper's text writes it; ``"sigmoid"`` = x1 * sigmoid(x2), as the PixArt
    checkpoints do.

    Init: the output projection and the pool branch start at ``out_init_std`` (weights) and zero (biases),
    so a freshly inserted block adds almost nothing to the residual stream and the student starts close to
    the attention-free model instead of adding noise to every block.

    Args:
        channels: token width C (divisible by 4).
        kernel_size: odd depthwise kernel size k (same padding).
        scales: pyramid scales, each in (0, 1]; the first is usually 1.
        gate: ``"mul"``, ``"div"`` or ``"sigmoid"`` (see above).
        out_init_std: standard deviation of the output-side weights at init.
        generator: private RNG for the init (the global RNG is not touched when one is given).

    Example:
        >>> block = PyramidConvBlock(320, kernel_size=7)
        >>> block(torch.randn(2, 64 * 48, 320), (64, 48)).shape
        torch.Size([2, 3072, 320])
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        scales: Sequence[float] = (1.0, 0.5),
        gate: Gate = "mul",
        out_init_std: float = 1e-3,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if channels <= 0 or channels % 4:
            raise ValueError(f"channels must be a positive multiple of 4 (halves of C/2), got {channels}.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number (same padding), got {kernel_size}.")
        scales = tuple(float(s) for s in scales)
        if not scales or any(not 0.0 < s <= 1.0 for s in scales):
            raise ValueError(f"scales must be a non-empty list of values in (0, 1], got {scales}.")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}.")
        self.channels = channels
        self.kernel_size = kernel_size
        self.scales = scales
        self.gate = gate
        self.out_init_std = out_init_std
        hidden = channels // 2
        # skip_init: the layers' own init would draw from the global RNG; reset_parameters draws from ours.
        self.conv_up = skip_init(nn.Linear, channels, hidden)
        self.dw_convs = nn.ModuleList(
            skip_init(nn.Conv2d, hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=False)
            for _ in scales
        )
        self.conv_out = skip_init(nn.Linear, hidden // 2 * len(scales), channels)
        self.conv_pool = skip_init(nn.Linear, channels, channels)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Input side: PyTorch's default range U(-1/sqrt(fan_in), 1/sqrt(fan_in)); output side (projection
        and pool branch): N(0, out_init_std) weights and zero biases. Draws only from ``generator``."""
        for layer in (self.conv_up, *self.dw_convs):
            fan_in = layer.weight[0].numel()
            for param in (layer.weight, layer.bias):
                if param is not None:
                    bound = 1.0 / math.sqrt(fan_in)
                    param.uniform_(-bound, bound, generator=generator)
        for layer in (self.conv_out, self.conv_pool):
            layer.weight.normal_(0.0, self.out_init_std, generator=generator)
            layer.bias.zero_()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, scales={self.scales}, gate={self.gate!r}"

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C/2] -> [B, H, W, C/4]; the constant of the "mul"/"div" gates is applied later."""
        x1, x2 = x.chunk(2, dim=-1)
        return x1 * torch.sigmoid(x2) if self.gate == "sigmoid" else x1 * x2

    def _gate_factor(self) -> float:
        """sqrt(C/4) ("mul"), 1/sqrt(C/4) ("div") or 1 ("sigmoid"). Bilinear upsampling and the output
        projection are linear, so the factor is folded into the projection weight: one pass less."""
        if self.gate == "sigmoid":
            return 1.0
        factor = math.sqrt(self.channels / 4)
        return factor if self.gate == "mul" else 1.0 / factor

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """tokens [B, N, C] on a row-major (h, w) grid with N == h * w -> [B, N, C]."""
        batch, num_tokens, channels = tokens.shape
        height, width = grid
        if channels != self.channels:
            raise ValueError(f"Expected tokens with {self.channels} channels, got {channels}.")
        if height * width != num_tokens:
            raise ValueError(f"Grid {height}x{width} holds {height * width} tokens, but got {num_tokens}.")
        hidden = self.conv_up(tokens)  # [B, N, C/2], memory = NHWC
        spatial = hidden.view(batch, height, width, -1).permute(0, 3, 1, 2)  # channels-last NCHW view
        stages = []
        for scale, conv in zip(self.scales, self.dw_convs, strict=True):
            x = spatial
            if scale != 1.0:
                x = F.adaptive_avg_pool2d(x, (_pooled_size(height, scale), _pooled_size(width, scale)))
            x = conv(x.contiguous(memory_format=torch.channels_last))
            x = self._gate(x.permute(0, 2, 3, 1))  # [B, h, w, C/4]
            if x.shape[1:3] != (height, width):
                x = F.interpolate(
                    x.permute(0, 3, 1, 2), size=(height, width), mode="bilinear", align_corners=False
                ).permute(0, 2, 3, 1)
            stages.append(x.reshape(batch, num_tokens, -1))
        # conv_out(cat(stages)) + conv_pool(mean) as GEMMs accumulating into one buffer: no concatenation
        # and no separate broadcast add over the [B, N, C] output.
        bias = self.conv_out.bias + self.conv_pool(tokens.mean(dim=1))  # [B, C]
        weights = (self.conv_out.weight * self._gate_factor()).T.chunk(len(stages), dim=0)
        out = torch.baddbmm(bias[:, None, :], stages[0], weights[0].expand(batch, -1, -1))
        for stage, weight in zip(stages[1:], weights[1:], strict=True):
            out.baddbmm_(stage, weight.expand(batch, -1, -1))
        return out
