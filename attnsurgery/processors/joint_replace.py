"""Base of the wrappers that compute a DiT layer's joint attention call themselves (local attention, merging).

The layer's own processor runs (projections, qk_norm, RoPE, SD3.5's dual attention, IP-Adapter, LoRA);
only the first ``scaled_dot_product_attention`` call it makes is replaced, so the technique sees exactly the
queries, keys and values the model would attend with (keys after RoPE). Where the image tokens sit in that
call is the layer's declared text placement; the non-image count is the call's length minus the image grid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import WrappingProcessor
from .sdpa_intercept import ReplacedAttentionCall

__all__ = ["JointCallProcessor", "Pair", "JointCompute", "split_tokens", "join_tokens"]

Pair = tuple[int, int]
#: (q, k, v, call) -> out: a replacement for the call, ``[batch, heads, tokens, dim]`` in and out.
JointCompute = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]


class JointCallProcessor(WrappingProcessor):
    """Runs the layer's processor with its attention call computed by :meth:`plan`'s choice, if any.

    Subclasses implement :meth:`plan`; returning None passes the call through untouched (bit-identical).

    Args:
        inner: the layer's current processor.
        path: the layer's path (error messages).
        text_first: the layer's non-image tokens come before its image tokens (else after them).
        technique: the plugin's name, for error messages.
    """

    def __init__(self, inner: Any, *, path: str, text_first: bool, technique: str) -> None:
        super().__init__(inner)
        self.path = path
        self.text_first = text_first
        self.technique = technique

    def plan(self) -> JointCompute | None:
        """The replacement for this call's attention, or None to leave the layer alone."""
        raise NotImplementedError

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        compute = self.plan()
        if compute is None:
            return self.inner(attn, hidden_states, *args, **kwargs)
        with ReplacedAttentionCall(compute) as mode:
            result = self.inner(attn, hidden_states, *args, **kwargs)
        if mode.calls == 0:
            raise RuntimeError(
                f"{self.technique} could not reach the attention of layer {self.path!r}: its processor "
                f"{type(self.inner).__name__} made no torch scaled_dot_product_attention call. Use diffusers' "
                f"native attention backend for the layers {self.technique} changes."
            )
        return result

    def num_text(self, grid: Pair, q: torch.Tensor) -> int:
        """Non-image tokens of the call (text, pads), or a clear error for a layer that misses image tokens."""
        num_text = q.shape[2] - grid[0] * grid[1]
        if num_text < 0:
            raise RuntimeError(
                f"layer {self.path!r} attends over {q.shape[2]} tokens, fewer than the {grid[0]}x{grid[1]} image "
                f"grid of this call; it does not see the whole image. Leave it out of {self.technique}(layers=...)."
            )
        return num_text

    def check_call(self, q: torch.Tensor, k: torch.Tensor, call: dict[str, Any]) -> None:
        """Refuse what a regrouped call cannot reproduce: dropout, causal masks, grouped KV heads."""
        if call["dropout_p"] or call["is_causal"] or q.shape[1] != k.shape[1]:
            raise NotImplementedError(
                f"layer {self.path!r} calls attention with dropout, a causal mask or grouped KV heads; "
                f"{self.technique} supports plain bidirectional attention only"
            )


def split_tokens(x: torch.Tensor, num_text: int, text_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, H, N, D]`` -> (text part, image part) along the tokens, by the declared placement."""
    if text_first:
        return x[:, :, :num_text], x[:, :, num_text:]
    image = x.shape[2] - num_text
    return x[:, :, image:], x[:, :, :image]


def join_tokens(text: torch.Tensor, image: torch.Tensor, text_first: bool) -> torch.Tensor:
    """The inverse of :func:`split_tokens`."""
    return torch.cat((text, image) if text_first else (image, text), dim=2)
