"""Window self-attention as a wrapper: the layer's own processor attends inside each window.

The wrapper only rearranges tokens (`attnsurgery.ops.windows`); projections, LoRA, the attention
kernel and everything else stay in the inner processor. Windows become extra batch rows, so the
inner processor needs no change; a padded (odd-sized) grid adds a key mask that hides the padding.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from ..ops.windows import WindowGrid, key_mask_to_bias, merge_windows, partition_windows, window_key_mask
from .base import WrappingProcessor

__all__ = ["WindowAttentionProcessor", "WindowPlan"]

WindowPlan = Callable[[int], "WindowGrid | None"]
"""Given the number of image tokens of a call, the window layout to use, or None to attend globally."""


def _window_mask(
    grid: WindowGrid, user_mask: torch.Tensor | None, batch: int, like: torch.Tensor
) -> torch.Tensor | None:
    """Additive key bias `[batch * windows, 1, tokens_per_window]` for padding and any caller mask."""
    padding = window_key_mask(grid, like.device)
    bias = None if padding is None else key_mask_to_bias(padding.repeat(batch, 1), like.dtype)
    if user_mask is None:
        return bias
    tokens = grid.height * grid.width
    if user_mask.dim() != 3 or user_mask.shape[1] != 1 or user_mask.shape[-1] != tokens:
        raise NotImplementedError(
            f"window attention got an attention mask of shape {tuple(user_mask.shape)}; only key masks "
            f"[batch, 1, {tokens}] can be split into windows. Drop the mask or the window plugin."
        )
    if user_mask.dtype == torch.bool:
        user_mask = key_mask_to_bias(user_mask[:, 0], like.dtype)
    per_window = partition_windows(user_mask.transpose(1, 2).to(like.dtype), grid).transpose(1, 2)
    return per_window if bias is None else per_window + bias


class WindowAttentionProcessor(WrappingProcessor):
    """Self-attention restricted to the windows a `plan` chooses per call (HiDiffusion's MSW-MSA).

    Cross-attention calls (with `encoder_hidden_states`) and calls the plan declines pass through
    unchanged, so the wrapper is exact whenever it is idle.

    Args:
        inner: The layer's current processor; it computes attention on the stacked windows.
        plan: Maps the call's token count to a `WindowGrid` (with this call's shift) or None.

    Example:
        >>> plan = lambda n: WindowGrid(64, 64, shift=(8, 8)) if n == 64 * 64 else None
        >>> wrapper = WindowAttentionProcessor(layer.module.processor, plan)
        >>> surgery.set_processor(layer, wrapper, role="tokens") is wrapper.inner
        True
    """

    def __init__(self, inner: Any, plan: WindowPlan) -> None:
        super().__init__(inner)
        self.plan = plan
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        parameters = inspect.signature(inner.__call__).parameters.values()
        self._positional_names = [p.name for p in parameters if p.kind in positional][2:]

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args:  # diffusers passes keywords; name positional extras so none is lost
            if len(args) > len(self._positional_names):
                raise TypeError(f"{type(self.inner).__name__} takes no {len(args)} positional extras: {args!r}")
            kwargs = {**dict(zip(self._positional_names, args)), **kwargs}
        grid = None
        if hidden_states.dim() == 3 and kwargs.get("encoder_hidden_states") is None:
            grid = self.plan(hidden_states.shape[1])
        if grid is None:
            return self.inner(attn, hidden_states, **kwargs)
        batch = hidden_states.shape[0]
        mask = _window_mask(grid, kwargs.get("attention_mask"), batch, hidden_states)
        if mask is not None:
            kwargs["attention_mask"] = mask
        if kwargs.get("temb") is not None:
            kwargs["temb"] = kwargs["temb"].repeat_interleave(grid.num_windows, dim=0)
        windows = self.inner(attn, partition_windows(hidden_states, grid), **kwargs)
        return merge_windows(windows, grid)
