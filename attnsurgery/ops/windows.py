"""Window partition and merge for shifted-window self-attention (HiDiffusion's MSW-MSA).

A token sequence laid out on an (height, width) grid is cyclically shifted, cut into a
rows x cols grid of equal windows, and the windows are stacked along the batch axis, so any
attention kernel attends within each window only. Odd sizes are padded at the bottom/right
after the shift (never resampled); padded tokens are excluded as keys by `window_key_mask`.
Tokens that wrap around the edge share a window with the opposite edge (no Swin mask), as in
the HiDiffusion paper.

Shapes: tokens `[batch, height * width, channels]` (row-major), windows
`[batch * rows * cols, window_height * window_width, channels]`, batch-major.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "NUM_SHIFTS",
    "WindowGrid",
    "draw_shift_index",
    "key_mask_to_bias",
    "merge_windows",
    "partition_windows",
    "shift_for_index",
    "window_key_mask",
]

NUM_SHIFTS = 4
"""MSW-MSA draws one of four diagonal shifts per call: k * (window // 4) for k in 0..3."""


@dataclass(frozen=True)
class WindowGrid:
    """How an (height, width) token grid is shifted and cut into rows x cols windows.

    Args:
        height: Token rows of the feature map.
        width: Token columns of the feature map.
        rows: Windows along the height (HiDiffusion: 2).
        cols: Windows along the width (HiDiffusion: 2).
        shift: Cyclic shift (rows, cols) applied before partitioning; tokens move by -shift.
        shift_by: The shift as a ``[2]`` int64 tensor instead of ``shift``: a compiled graph takes a new one
            per call without recompiling (the same tokens move as with ``shift``).

    Example:
        >>> WindowGrid(5, 8).window
        (3, 4)
    """

    height: int
    width: int
    rows: int = 2
    cols: int = 2
    shift: tuple[int, int] = (0, 0)
    shift_by: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"WindowGrid needs a non-empty token grid, got {self.height}x{self.width}.")
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"WindowGrid needs at least one window per axis, got {self.rows}x{self.cols}.")
        wh, ww = self.window
        if (self.rows - 1) * wh >= self.height or (self.cols - 1) * ww >= self.width:
            raise ValueError(
                f"WindowGrid of {self.rows}x{self.cols} windows does not fit a {self.height}x{self.width} "
                "token grid (some window would hold only padding); use fewer windows."
            )

    @property
    def window(self) -> tuple[int, int]:
        """Window size (ceil(height / rows), ceil(width / cols))."""
        return math.ceil(self.height / self.rows), math.ceil(self.width / self.cols)

    @property
    def padded(self) -> tuple[int, int]:
        """Grid size after bottom/right padding to a whole number of windows."""
        wh, ww = self.window
        return wh * self.rows, ww * self.cols

    @property
    def needs_padding(self) -> bool:
        return self.padded != (self.height, self.width)

    @property
    def num_windows(self) -> int:
        return self.rows * self.cols

    @property
    def tokens_per_window(self) -> int:
        wh, ww = self.window
        return wh * ww


def shift_for_index(window: tuple[int, int], index: int) -> tuple[int, int]:
    """The `index`-th MSW-MSA shift for a window size: index * (wh // 4, ww // 4)."""
    if not 0 <= index < NUM_SHIFTS:
        raise ValueError(f"shift index must be in 0..{NUM_SHIFTS - 1}, got {index}.")
    wh, ww = window
    return index * (wh // 4), index * (ww // 4)


def draw_shift_index(generator: torch.Generator) -> int:
    """One uniform draw from the four MSW-MSA shifts, from a private generator."""
    return int(torch.randint(NUM_SHIFTS, (1,), generator=generator, device=generator.device).item())


def _to_windows(grid_tokens: torch.Tensor, grid: WindowGrid) -> torch.Tensor:
    """[batch, padded_h, padded_w, channels] -> [batch * windows, tokens_per_window, channels]."""
    batch, channels = grid_tokens.shape[0], grid_tokens.shape[-1]
    wh, ww = grid.window
    windows = grid_tokens.view(batch, grid.rows, wh, grid.cols, ww, channels).permute(0, 1, 3, 2, 4, 5)
    return windows.reshape(batch * grid.num_windows, wh * ww, channels)


def _roll(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``torch.roll(x, shifts=tuple(shift), dims=(1, 2))`` for a tensor ``shift``, as two gathers."""
    rows = (torch.arange(x.shape[1], device=x.device) - shift[0].to(x.device)) % x.shape[1]
    cols = (torch.arange(x.shape[2], device=x.device) - shift[1].to(x.device)) % x.shape[2]
    return x.index_select(1, rows).index_select(2, cols)


def partition_windows(tokens: torch.Tensor, grid: WindowGrid) -> torch.Tensor:
    """Shift, pad and cut a token sequence into windows stacked along the batch.

    Args:
        tokens: `[batch, height * width, channels]`, row-major over the grid.
        grid: The window layout.

    Returns:
        `[batch * rows * cols, window_h * window_w, channels]`; window index = b * rows * cols + r * cols + c.
    """
    batch, num_tokens, channels = tokens.shape
    if num_tokens != grid.height * grid.width:
        raise ValueError(
            f"partition_windows got {num_tokens} tokens for a {grid.height}x{grid.width} grid "
            f"({grid.height * grid.width} tokens); pass the grid of this layer's feature map."
        )
    x = tokens.view(batch, grid.height, grid.width, channels)
    if grid.shift_by is not None:
        x = _roll(x, -grid.shift_by)
    elif grid.shift != (0, 0):
        x = torch.roll(x, shifts=(-grid.shift[0], -grid.shift[1]), dims=(1, 2))
    if grid.needs_padding:
        ph, pw = grid.padded
        x = F.pad(x, (0, 0, 0, pw - grid.width, 0, ph - grid.height))
    return _to_windows(x, grid)


def merge_windows(windows: torch.Tensor, grid: WindowGrid) -> torch.Tensor:
    """Inverse of `partition_windows`: drop padding, undo the shift.

    Args:
        windows: `[batch * rows * cols, window_h * window_w, channels]`.
        grid: The layout the windows were cut with.

    Returns:
        `[batch, height * width, channels]`.
    """
    wh, ww = grid.window
    channels = windows.shape[-1]
    batch = windows.shape[0] // grid.num_windows
    ph, pw = grid.padded
    x = windows.view(batch, grid.rows, grid.cols, wh, ww, channels).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch, ph, pw, channels)
    if grid.needs_padding:
        x = x[:, : grid.height, : grid.width]
    if grid.shift_by is not None:
        x = _roll(x, grid.shift_by)
    elif grid.shift != (0, 0):
        x = torch.roll(x, shifts=grid.shift, dims=(1, 2))
    return x.reshape(batch, grid.height * grid.width, channels)


def window_key_mask(grid: WindowGrid, device: torch.device | str | None = None) -> torch.Tensor | None:
    """Which window slots hold real tokens: `[rows * cols, tokens_per_window]` bool, or None without padding.

    Repeat it over the batch (`mask.repeat(batch, 1)`) to match `partition_windows`' batch-major order.
    """
    if not grid.needs_padding:
        return None
    ph, pw = grid.padded
    real = torch.zeros(1, ph, pw, 1, dtype=torch.bool, device=device)
    real[:, : grid.height, : grid.width] = True
    return _to_windows(real, grid).view(grid.num_windows, grid.tokens_per_window)


def key_mask_to_bias(key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool key mask `[n, keys]` (True = attend) -> additive bias `[n, 1, keys]` for attention processors.

    Uses the dtype's most negative finite value rather than -inf, which some kernels turn into NaN.
    """
    bias = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
    bias.masked_fill_(~key_mask, torch.finfo(dtype).min)
    return bias.unsqueeze(1)
