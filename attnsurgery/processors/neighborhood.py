"""Neighborhood attention as a wrapper: the layer's own processor runs, only its dense attention call changes.

Projections, qk_norm, RoPE, SD3.5's dual attention, IP-Adapter and LoRA stay in the inner processor; the
first SDPA call it makes is computed by :func:`attnsurgery.ops.neighborhood.neighborhood_attention` instead
(image queries see their image neighbourhood and every text key; text queries see everything). Where the
text tokens sit is the layer's declared ``text_placement``, never guessed from shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..context import StepContext
from ..ops.neighborhood import neighborhood_attention
from .joint_replace import JointCallProcessor, JointCompute, Pair, call_scale

__all__ = ["NeighborhoodSchedule", "NeighborhoodProcessor", "proportional_factor"]


def proportional_factor(num_keys: int, native_keys: int) -> float:
    """Jin et al.'s logit scale ``sqrt(log N / log N_native)``: keeps a global layer's attention entropy near
    its trained value when a larger image gives it more keys."""
    return math.sqrt(math.log(num_keys) / math.log(native_keys))


@dataclass
class NeighborhoodSchedule:
    """When and how the layers of one plugin application attend locally (shared by their processors).

    Attributes:
        context: the surgery's step clock (latent grid, schedule position).
        native_grid: the family's native image-token grid (rows, cols).
        window, stride, dilation: the neighbourhood, per axis (rows, cols).
        start, stop: local attention for steps in ``[start, stop)`` of the schedule; global outside.
        force: act at or below the native grid too.
        proportional: scale the logits of calls that stay global above native size.
        backend: the op's backend name.
    """

    context: StepContext
    native_grid: Pair
    window: Pair
    stride: Pair
    dilation: Pair
    start: float
    stop: float
    force: bool
    proportional: bool
    backend: str

    def __post_init__(self) -> None:
        self.context.watch(self.start, self.stop)

    def grid(self) -> Pair:
        """The image-token grid of the current denoiser call."""
        return self.context.image_grid()

    def above_native(self, grid: Pair) -> bool:
        """True when either side of ``grid`` exceeds the native grid (where the plugin acts by default)."""
        return grid[0] > self.native_grid[0] or grid[1] > self.native_grid[1]

    def local_now(self) -> bool:
        """True while the current step lies in ``[start, stop)`` of the schedule (HiDiffusion's step rule)."""
        return self.context.in_first(self.stop) and not self.context.in_first(self.start)


class NeighborhoodProcessor(JointCallProcessor):
    """Computes a layer's attention over the image-token neighbourhoods a schedule chooses per call.

    Idle (at or below native size, or a global step without proportional scaling) it is a plain
    pass-through, so outputs are bit-identical to the unwrapped layer.

    Args:
        inner: the layer's current processor.
        path: the layer's path (for error messages).
        text_first: the layer's non-image tokens come before the image tokens (else after them).
        schedule: the shared schedule.
        local: this layer attends locally in local steps; False keeps it global (only proportional scaling).
    """

    def __init__(
        self, inner: Any, *, path: str, text_first: bool, schedule: NeighborhoodSchedule, local: bool = True
    ) -> None:
        super().__init__(inner, path=path, text_first=text_first, technique="NeighborhoodAttention")
        self.schedule = schedule
        self.local = local

    def plan(self) -> JointCompute | None:
        schedule = self.schedule
        grid = schedule.grid()
        if not (schedule.force or schedule.above_native(grid)):
            return None
        if self.local and schedule.local_now():
            return lambda q, k, v, call: self._local(grid, q, k, v, call)
        if schedule.proportional and schedule.above_native(grid):
            return lambda q, k, v, call: self._proportional(grid, q, k, v, call)
        return None

    def _local(
        self, grid: Pair, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: dict[str, Any]
    ) -> torch.Tensor:
        x, schedule = self.inputs(grid, q, k, v, call, text_key_masks=True), self.schedule
        out = neighborhood_attention(
            x.q,
            x.k,
            x.v,
            grid,
            schedule.window,
            schedule.stride,
            schedule.dilation,
            num_text=x.num_text,
            text_first=self.text_first,
            scale=x.scale,
            backend=schedule.backend,
            text_key_mask=x.text_key_mask,
        )
        return x.output(out)

    def _proportional(
        self, grid: Pair, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: dict[str, Any]
    ) -> torch.Tensor:
        native = self.schedule.native_grid
        factor = proportional_factor(k.shape[2], native[0] * native[1] + self.num_text(grid, q))
        return F.scaled_dot_product_attention(q, k, v, **{**call, "scale": call_scale(call, q) * factor})
