"""Which keys each query sees in 2-D neighbourhood attention over a joint text + image sequence.

Pure geometry, no attention: the backends in ``ops/neighborhood_backends/`` and the tests build on it, so the
rule (docs/techniques/neighborhood-attention.md) lives in one place (:func:`window_start`).

Per axis of length ``L``, with window ``k``, stride ``s`` and dilation ``d``:

- positions with the same ``i mod d`` form a sub-axis (length ``ceil((L - r) / d)`` for residue ``r``); a
  query attends only within its own sub-axis;
- on a sub-axis of length ``M``, query ``i`` belongs to group ``g = i // s`` and sees the sub-axis positions
  ``[start, start + k)`` with ``start = clamp(g*s + floor((s - k) / 2), 0, M - k)``: every query of one group
  shares one window, and a window is pushed inward at the borders instead of reading padding.

The 2-D key set is the product of the row set and the column set. Image queries also see every text key;
text queries see every key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["AXES", "NeighborhoodSpec", "Pair", "window_start"]

Pair = int | tuple[int, int]
"""An int for both axes, or a (rows, cols) pair."""

AXES = ("rows", "cols")


def window_start(i: int, length: int, window: int, stride: int) -> int:
    """First sub-axis position of query ``i``'s window: ``clamp(g*s + floor((s - k) / 2), 0, M - k)``.

    Args:
        i: the query's position on its sub-axis, ``0 <= i < length``.
        length: the sub-axis length ``M``.
        window: ``k``, at most ``length``.
        stride: ``s``, between 1 and ``window``.

    Example:
        >>> [window_start(i, 7, 3, 1) for i in range(7)]
        [0, 0, 1, 2, 3, 4, 4]
        >>> [window_start(i, 8, 4, 4) for i in range(8)]
        [0, 0, 0, 0, 4, 4, 4, 4]
    """
    group = i // stride
    return min(max(group * stride + (stride - window) // 2, 0), length - window)


def _pair(name: str, value: Pair) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be an int or a (rows, cols) pair of ints, got {value!r}.")


@dataclass(frozen=True)
class NeighborhoodSpec:
    """The attention pattern of one call: image grid, per-axis window/stride/dilation, where the text sits.

    ``window``, ``stride`` and ``dilation`` accept an int or a (rows, cols) pair and are stored as pairs. A
    window larger than a grid side is clamped to the side (the whole axis: a native-sized window on a smaller
    grid is dense attention); the stride is then clamped to the window. Everything else that the semantics
    exclude is an error.

    Args:
        grid: image tokens (rows, cols), row-major in the sequence.
        window: keys per axis ``k`` (clamped to the side).
        stride: ``s``, ``1 <= s <= k``; 1 is neighbourhood attention, ``k`` is blocked (non-overlapping)
            attention, in between GNA's strided neighbourhood.
        dilation: ``d``, ``d * k`` at most the side.
        num_text: non-image ("text") tokens, before or after the image tokens.
        text_first: whether the text tokens come first in the sequence.

    Example:
        >>> spec = NeighborhoodSpec((8, 12), window=(4, 20), stride=2, num_text=4)
        >>> spec.window, spec.stride
        ((4, 12), (2, 2))
        >>> spec.axis_keys(0)[0].tolist(), spec.axis_keys(0)[5].tolist()
        ([0, 1, 2, 3], [3, 4, 5, 6])
        >>> round(spec.flops_ratio, 3)
        0.539
    """

    grid: tuple[int, int]
    window: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    num_text: int = 0
    text_first: bool = True

    def __post_init__(self) -> None:
        grid, window = _pair("grid", self.grid), _pair("window", self.window)
        stride, dilation = _pair("stride", self.stride), _pair("dilation", self.dilation)
        for name, pair, fix in (
            ("grid", grid, "pass the image token grid (rows, cols)"),
            ("window", window, "use a window of at least 1 token per axis"),
            ("stride", stride, "use stride 1 for neighbourhood attention"),
            ("dilation", dilation, "use dilation 1 for contiguous windows"),
        ):
            if min(pair) < 1:
                raise ValueError(f"{name} {pair} must be >= 1 on both axes; {fix}.")
        if self.num_text < 0:
            raise ValueError(f"num_text {self.num_text} must be >= 0; pass 0 for an image-only sequence.")
        for axis, name in enumerate(AXES):
            if stride[axis] > window[axis]:
                raise ValueError(
                    f"stride {stride[axis]} exceeds window {window[axis]} on the {name} axis; use a stride "
                    f"<= {window[axis]} (stride == window is blocked attention)."
                )
        window = (min(window[0], grid[0]), min(window[1], grid[1]))
        for axis, name in enumerate(AXES):
            if dilation[axis] * window[axis] > grid[axis]:
                raise ValueError(
                    f"dilation {dilation[axis]} x window {window[axis]} = {dilation[axis] * window[axis]} "
                    f"positions exceed the {name} side {grid[axis]} (a sub-axis would be shorter than the "
                    f"window); use dilation <= {grid[axis] // window[axis]} or window <= "
                    f"{grid[axis] // dilation[axis]}."
                )
        stride = (min(stride[0], window[0]), min(stride[1], window[1]))
        for name, value in (("grid", grid), ("window", window), ("stride", stride), ("dilation", dilation)):
            object.__setattr__(self, name, value)

    @property
    def num_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_text + self.num_image

    @property
    def is_dense(self) -> bool:
        """Every image query sees every image key (the window covers the grid, no dilation)."""
        return self.window == self.grid

    def sub_lengths(self, axis: int) -> list[int]:
        """Length of each dilation sub-axis of ``axis``, by residue ``r``: ``ceil((L - r) / d)``."""
        side, d = self.grid[axis], self.dilation[axis]
        return [math.ceil((side - r) / d) for r in range(d)]

    def axis_starts(self, axis: int) -> torch.Tensor:
        """``[L]`` int64: each position's window start, in the coordinates of its sub-axis."""
        side, d, k, s = self.grid[axis], self.dilation[axis], self.window[axis], self.stride[axis]
        lengths = self.sub_lengths(axis)
        return torch.tensor([window_start(i // d, lengths[i % d], k, s) for i in range(side)], dtype=torch.int64)

    def axis_keys(self, axis: int) -> torch.Tensor:
        """``[L, k]`` int64: the grid positions each position attends to along ``axis``, ascending.

        Position ``i`` on sub-axis ``r = i mod d`` sees ``r + d * j`` for ``j`` in its window.
        """
        side, d = self.grid[axis], self.dilation[axis]
        positions = torch.arange(side)
        offsets = self.axis_starts(axis)[:, None] + torch.arange(self.window[axis])
        return positions[:, None] % d + d * offsets

    def axis_mask(self, axis: int) -> torch.Tensor:
        """``[L, L]`` bool: query position (row) attends key position (column) along ``axis``."""
        side = self.grid[axis]
        mask = torch.zeros(side, side, dtype=torch.bool)
        return mask.scatter_(1, self.axis_keys(axis), True)

    def image_mask(self) -> torch.Tensor:
        """``[P, P]`` bool over row-major image tokens: the product of the row and column masks."""
        rows, cols = self.axis_mask(0), self.axis_mask(1)
        return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(self.num_image, self.num_image)

    def image_slice(self) -> slice:
        """Where the image tokens sit in the sequence."""
        return slice(self.num_text, None) if self.text_first else slice(0, self.num_image)

    def text_slice(self) -> slice:
        """Where the text tokens sit in the sequence."""
        return slice(0, self.num_text) if self.text_first else slice(self.num_image, None)

    def token_mask(self) -> torch.Tensor:
        """``[N, N]`` bool in sequence order: which keys (columns) each query (row) attends."""
        mask = torch.ones(self.num_tokens, self.num_tokens, dtype=torch.bool)
        image = self.image_slice()
        mask[image, image] = self.image_mask()
        return mask

    @property
    def flops_ratio(self) -> float:
        """Attended (query, key) pairs over the dense ``N * N``: the attention FLOP ratio against dense."""
        pairs = self.num_image * (self.window[0] * self.window[1] + self.num_text) + self.num_text * self.num_tokens
        return pairs / self.num_tokens**2
