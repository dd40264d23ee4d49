"""RoPE extrapolation for FLUX-family position embeddings: NTK-aware scaling and YaRN.

FLUX-family transformers embed each token's ids ``(index, row, col, ...)`` with one rotary band per axis
(FLUX.1: axes (16, 56, 56), theta 10000). Above the trained grid the row/col positions exceed what the
model saw; both methods stretch the spatial bands by ``alpha = side / native side`` (per axis):

- NTK-aware: ``theta' = theta * alpha ** (dim / (dim - 2))``: low frequencies interpolate, high ones barely move.
- YaRN (Peng et al. 2023): per frequency, interpolate (``freq / alpha``) the bands whose wavelength is long
  against the native side, keep the short ones, blend linearly in between (ramp from 1 to 32 turns per
  native side), and scale the logits by the attention temperature ``(0.1 ln alpha + 1) ** 2`` (cos and sin
  each carry one factor, so q and k do). The ramp is YaRN's LLM default; over FLUX.1's 64-token native side
  the fastest band turns only ~10 times, so every spatial band is at least partly interpolated there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = ["ROPE_SCALINGS", "rotary_bands", "yarn_temperature", "ScaledRope"]

ROPE_SCALINGS = ("ntk", "yarn")
#: YaRN's ramp, in full turns of a band over the native side: below BETA_LOW interpolate, above BETA_HIGH keep.
BETA_LOW, BETA_HIGH = 1.0, 32.0


def _frequencies(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def rotary_bands(
    positions: torch.Tensor, dim: int, theta: float, alpha: float = 1.0, kind: str | None = None, native: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[tokens, dim]`` of one axis, each frequency repeated twice (diffusers' interleaved form).

    Args:
        positions: float positions ``[tokens]`` along the axis.
        dim: the axis band's width (even).
        theta: the RoPE base.
        alpha: how many times the native side this call's side is (1: unchanged).
        kind: None (plain RoPE), "ntk" or "yarn".
        native: the native side in tokens (YaRN's wavelength reference).
    """
    if kind == "ntk" and alpha > 1:
        theta = theta * alpha ** (dim / (dim - 2))
    freqs = _frequencies(dim, theta)
    if kind == "yarn" and alpha > 1:
        turns = native * freqs / (2 * math.pi)
        keep = ((turns - BETA_LOW) / (BETA_HIGH - BETA_LOW)).clamp(0, 1)
        freqs = (1 - keep) * freqs / alpha + keep * freqs
    angles = torch.outer(positions.double(), freqs.to(positions.device))
    cos, sin = angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)
    return cos.float(), sin.float()


def yarn_temperature(alpha: float) -> float:
    """YaRN's per-factor attention temperature ``0.1 ln(alpha) + 1`` (1 at or below the native size)."""
    return 0.1 * math.log(alpha) + 1.0 if alpha > 1 else 1.0


class ScaledRope(torch.nn.Module):
    """Stands in for a FLUX-family position embedding (``theta``, ``axes_dim``, ``forward(ids) -> (cos, sin)``)
    and stretches its spatial axes by the call's ``alpha``; at ``alpha <= 1`` it calls the original.

    Args:
        original: the model's embedding module (kept, so restoring is exact).
        kind: "ntk" or "yarn".
        spatial_axes: ``{axis index: native side in tokens}`` for the row and col axes of the ids.
        alphas: returns the current ``{axis index: alpha}`` (from the step clock's latent grid).
    """

    def __init__(
        self,
        original: torch.nn.Module,
        kind: str,
        spatial_axes: dict[int, int],
        alphas: Callable[[], dict[int, float]],
    ) -> None:
        super().__init__()
        if kind not in ROPE_SCALINGS:
            raise ValueError(f"rope must be one of {ROPE_SCALINGS} or None, got {kind!r}")
        self.original = original
        self.kind = kind
        self.spatial_axes = spatial_axes
        self.alphas = alphas
        self.theta = float(original.theta)
        self.axes_dim: Sequence[int] = tuple(original.axes_dim)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alphas = self.alphas()
        if all(a <= 1 for a in alphas.values()):
            return self.original(ids)
        if ids.dim() != 2:
            raise NotImplementedError(f"rope scaling takes ids [tokens, axes], got shape {tuple(ids.shape)}")
        bands = [
            rotary_bands(
                ids[:, axis], dim, self.theta, alphas.get(axis, 1.0), self.kind, self.spatial_axes.get(axis, 1)
            )
            for axis, dim in enumerate(self.axes_dim)
        ]
        cos = torch.cat([c for c, _ in bands], dim=-1).to(ids.device)
        sin = torch.cat([s for _, s in bands], dim=-1).to(ids.device)
        if self.kind == "yarn":
            temperature = yarn_temperature(max(alphas.values()))
            cos, sin = cos * temperature, sin * temperature
        return cos, sin
