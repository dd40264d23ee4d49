"""Base of the wrappers that compute a DiT layer's joint attention call themselves (local attention, merging).

The layer's own processor runs (projections, qk_norm, RoPE, SD3.5's dual attention, IP-Adapter, LoRA);
only the first ``scaled_dot_product_attention`` call it makes is replaced, so the technique sees exactly the
queries, keys and values the model would attend with (keys after RoPE). Where the image tokens sit in that
call is the layer's declared text placement; the non-image count is the call's length minus the image grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .attention_backend import layer_backend_route
from .base import WrappingProcessor, innermost
from .joint_masks import fold_product_bias, text_key_mask
from .sdpa_intercept import ReplacedAttentionCall

__all__ = [
    "JointCallProcessor",
    "JointInputs",
    "Pair",
    "JointCompute",
    "call_scale",
    "split_tokens",
    "join_tokens",
]

Pair = tuple[int, int]
#: (q, k, v, call) -> out: a replacement for the call, ``[batch, heads, tokens, dim]`` in and out.
JointCompute = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]


def call_scale(call: dict[str, Any], q: torch.Tensor) -> float:
    """The call's softmax scale (SDPA's default ``1 / sqrt(head_dim)`` when it gave none)."""
    return call["scale"] if call["scale"] is not None else q.shape[-1] ** -0.5


@dataclass(frozen=True)
class JointInputs:
    """One intercepted call, ready to regroup: no mask left in it except a boolean text-key keep vector.

    Attributes:
        q, k, v: the call's tensors; with a folded float mask, padded by a few channels.
        num_text: its non-image tokens.
        scale: its softmax scale.
        value_dim: the value channels the output keeps (see :meth:`output`).
        text_key_mask: ``[batch, num_text]`` bool keep vector of a boolean mask, or None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    num_text: int
    scale: float
    value_dim: int
    text_key_mask: torch.Tensor | None

    def output(self, out: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``out`` without the channels the mask fold added, in ``dtype`` if given."""
        out = out[..., : self.value_dim]
        return out if dtype is None else out.to(dtype)


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
        replaced = ReplacedAttentionCall(compute)
        with layer_backend_route(self.inner), replaced:
            result = self.inner(attn, hidden_states, *args, **kwargs)
        if replaced.calls == 0:
            raise RuntimeError(
                f"{self.technique} could not reach the attention of layer {self.path!r}: its processor "
                f"{type(innermost(self.inner)).__name__} made no torch scaled_dot_product_attention call (nor one "
                f"through diffusers' dispatch_attention_fn). Use the model's default processor for the layers "
                f"{self.technique} changes."
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

    def inputs(
        self,
        grid: Pair,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        call: dict[str, Any],
        text_key_masks: bool = False,
    ) -> JointInputs:
        """Check the call and take its mask apart: a float product mask (Chroma) is folded into q/k; a boolean
        one becomes a text-key keep vector where the technique takes one (``text_key_masks``), else is refused."""
        self.check_call(q, k, call)
        num_text, scale, mask = self.num_text(grid, q), call_scale(call, q), call["attn_mask"]
        keep, value_dim = None, v.shape[-1]
        if mask is not None and mask.dtype == torch.bool:
            keep = text_key_mask(mask, num_text, grid[0] * grid[1], self.text_first, self.path)
            if not text_key_masks:
                raise NotImplementedError(
                    f"layer {self.path!r} hides text keys with a boolean mask; {self.technique} does not take one"
                )
        elif mask is not None:
            q, k, v = fold_product_bias(mask, q, k, v, scale, self.path)
        return JointInputs(q, k, v, num_text, scale, value_dim, keep)

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
