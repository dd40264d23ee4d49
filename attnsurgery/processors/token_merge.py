"""Processors that merge tokens before a self-attention layer and unmerge its output (ToMe for SD).

ToMe for SD computes the matching on the transformer block's input (before the norm) and merges around
the attention sub-layer: ``x = unmerge(attn(merge(norm1(x)))) + x``. The block itself is left alone: a
forward pre-hook on the block hands its input to the layer's processor through a :class:`BlockInput`,
and the processor merges what the block passes to ``attn1`` (already normed) and unmerges what comes back
before the block adds the residual.
"""

from __future__ import annotations

from typing import Any

import torch

from ..context import StepContext
from ..ops.token_merge import TokenMatch, TokenMerge, match_tokens, plan_merge
from ..rng import CallInt
from .base import WrappingProcessor

__all__ = [
    "BlockInput",
    "MergingProcessor",
    "TokenMergeProcessor",
    "check_cells",
    "check_fraction",
    "check_self_attention_call",
]


def check_fraction(owner: str, name: str, value: float) -> None:
    """Merge ratios are fractions of the tokens in [0, 1); a string or bool is refused before comparing it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}.{name}={value!r} must be a number in [0, 1): the fraction of tokens merged away")


def check_cells(owner: str, sx: int, sy: int) -> None:
    """Cell sizes are positive integers, and a cell holds a source token besides its destination."""
    for name, value in (("sx", sx), ("sy", sy)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}.{name}={value!r} must be a positive integer (tokens per cell side)")
    if sx * sy < 2:
        raise ValueError(f"{owner}(sx=1, sy=1): a 1x1 cell is all destination, nothing merges; use sx * sy >= 2")


class BlockInput:
    """The input of the block around one attention layer, for the current call only.

    A forward pre-hook on the block stores it; the layer's processor takes it once, so no activation
    outlives its block call.
    """

    def __init__(self) -> None:
        self._value: torch.Tensor | None = None

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """``register_forward_pre_hook(..., with_kwargs=True)`` hook: remember the block's hidden states."""
        self._value = args[0] if args else kwargs.get("hidden_states")

    def take(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The stored block input, or ``hidden_states`` itself when none fits this call."""
        value, self._value = self._value, None
        if value is None or value.shape[:2] != hidden_states.shape[:2]:
            return hidden_states
        return value


def check_self_attention_call(hidden_states: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> None:
    """Token merging needs plain self-attention over a [B, N, C] sequence with no mask."""
    if hidden_states.dim() != 3:
        raise NotImplementedError(
            f"token merging needs [batch, tokens, channels] attention inputs, got shape "
            f"{tuple(hidden_states.shape)}; select transformer self-attention layers (attn1) instead"
        )
    extra = [name for name in ("encoder_hidden_states", "attention_mask") if kwargs.get(name) is not None]
    if extra or any(isinstance(arg, torch.Tensor) for arg in args):
        raise NotImplementedError(
            f"token merging got {', '.join(extra) or 'extra tensor arguments'} for a self-attention layer: "
            "merged tokens cannot follow a mask or a second sequence; exclude this layer (layers=...)"
        )


class MergingProcessor(WrappingProcessor):
    """Shared machinery: the metric from the block input, the token grid from the step clock, and the
    random dst choice from a private seed per call (position 0 for odd batches, as in ToMe for SD,
    where an odd batch cannot hold matching uncond/cond rows).

    Args:
        inner: the layer's current processor.
        context: the surgery's step clock (token grid of this call).
        block_input: where the block's pre-hook leaves its input.
        seed: this call's private seed of the dst choice, refreshed before each call; None always uses position 0.
    """

    def __init__(
        self,
        inner: Any,
        *,
        context: StepContext,
        block_input: BlockInput,
        seed: CallInt | None,
    ) -> None:
        super().__init__(inner)
        self.context = context
        self.block_input = block_input
        self.seed = seed

    def grid(self, hidden_states: torch.Tensor) -> tuple[int, int]:
        """Token grid (rows, cols) of this call, from the step clock."""
        return self.context.grid_for(hidden_states.shape[1])

    def match(self, metric: torch.Tensor, grid: tuple[int, int], sx: int, sy: int) -> TokenMatch:
        """Bipartite matching of this call's tokens on ``metric`` ([B, N, C] on an (h, w) grid)."""
        use_rand = self.seed is not None and metric.shape[0] % 2 == 0
        return match_tokens(metric, *grid, sx, sy, seed=self.seed.value if use_rand else None)

    def merged_inner(
        self, plan: TokenMerge, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """``unmerge(inner(merge(hidden_states)))``: the model's own attention on fewer tokens."""
        return plan.unmerge(self.inner(attn, plan.merge(hidden_states), *args, **kwargs))


class TokenMergeProcessor(MergingProcessor):
    """ToMe around the model's own attention processor.

    Args:
        inner: the layer's current processor.
        ratio: fraction of the tokens removed, ``r = floor(N * ratio)`` capped at the src count.
        sx: dst cell width.
        sy: dst cell height.
        **machinery: ``context``, ``block_input``, ``seed`` (see :class:`MergingProcessor`).
    """

    def __init__(self, inner: Any, *, ratio: float, sx: int, sy: int, **machinery: Any) -> None:
        super().__init__(inner, **machinery)
        self.ratio, self.sx, self.sy = ratio, sx, sy

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        check_self_attention_call(hidden_states, args, kwargs)
        metric = self.block_input.take(hidden_states)
        h, w = self.grid(hidden_states)
        r = int(hidden_states.shape[1] * self.ratio)
        if r <= 0 or h < self.sy or w < self.sx:  # nothing to merge, or no full cell to merge into
            return self.inner(attn, hidden_states, *args, **kwargs)
        plan = plan_merge(self.match(metric, (h, w), self.sx, self.sy), r)
        return self.merged_inner(plan, attn, hidden_states, *args, **kwargs)
