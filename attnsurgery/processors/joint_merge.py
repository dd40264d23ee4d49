"""Token merging inside a DiT layer's joint attention call: image keys/values (and queries) merged, text never.

At the SDPA call the keys already carry RoPE, so merging there averages rotated keys of similar tokens
(merging *positions* would be meaningless). The matching is ToMe for SD's bipartite matching on the image
grid (``ops.token_merge``), on the keys averaged over heads, with one dst per ``sx x sy`` cell drawn from the
plugin's private seed. Each merged key carries ToMe's proportional-attention bias ``log(size)``, so a
slot that stands for ``n`` equal keys gets exactly the weight those ``n`` keys had.

- ``kv``: queries untouched (every token keeps its own output, no unmerge); the keys and values of the
  image tokens are merged (ToDo-like, the cheap mode).
- ``qkv``: the image queries are merged with the same plan and their outputs copied back (ToMe).
Text tokens stay as they are in both, and every query sees every text key.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..context import StepContext
from ..ops.token_merge import TokenMatch, TokenMerge, match_tokens, plan_merge
from ..rng import CallInt
from .joint_replace import JointCallProcessor, JointCompute, Pair, split_tokens

__all__ = [
    "MERGE_MODES",
    "JointMergeProcessor",
    "merged_joint_attention",
    "key_bias",
    "match_image_keys",
]

MERGE_MODES = ("qkv", "kv")


def key_bias(plan: TokenMerge, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, 1, M]`` additive bias of merged keys: ``log(size)`` per slot, ToMe's proportional attention
    (0 on the tokens a plan keeps alone, such as text tokens passed through)."""
    return plan.counts[..., 0].to(dtype).log()[:, None, None]


def match_image_keys(image_k: torch.Tensor, grid: Pair, sx: int, sy: int, seed: CallInt | None) -> TokenMatch:
    """ToMe's bipartite matching of a call's image tokens on their keys averaged over heads; the dst position
    per cell is random (from this call's private ``seed``) for even batches only, as tomesd does."""
    rand = seed.value if seed is not None and image_k.shape[0] % 2 == 0 else None
    return match_tokens(image_k.mean(dim=1), grid[0], grid[1], sx, sy, seed=rand)


def merged_joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: TokenMerge,
    *,
    num_text: int,
    text_first: bool,
    mode: str,
    scale: float,
) -> torch.Tensor:
    """Joint attention with the image tokens merged by ``plan`` (the maths the tests check in float64).

    Args:
        q, k, v: ``[B, H, N, D]`` with ``N = num_text + image tokens``.
        plan: the merge of the image tokens (from :func:`attnsurgery.ops.token_merge.plan_merge`).
        num_text: non-image tokens; text_first: where they sit.
        mode: "kv" or "qkv".
        scale: softmax scale.
    """
    joint = plan.with_passthrough(num_text, text_first)
    keys, values, bias = joint.merge_heads(k), joint.merge_heads(v), key_bias(joint, q.dtype)
    if mode == "kv":
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale)
    out = F.scaled_dot_product_attention(joint.merge_heads(q), keys, values, attn_mask=bias, scale=scale)
    return joint.unmerge_heads(out)


class JointMergeProcessor(JointCallProcessor):
    """Merges a DiT layer's image tokens inside its attention call (see the module docstring).

    Args:
        inner: the layer's current processor.
        path, text_first: the layer and its declared text placement.
        context: the surgery's step clock (the call's image grid).
        ratio: fraction of image tokens merged away; 0 leaves the layer untouched.
        sx, sy: dst cell size in tokens.
        mode: "kv" or "qkv".
        seed: this call's private seed (random dst per cell), or None (cell position 0).
    """

    def __init__(
        self,
        inner: Any,
        *,
        path: str,
        text_first: bool,
        context: StepContext,
        ratio: float,
        sx: int,
        sy: int,
        mode: str,
        seed: CallInt | None = None,
    ) -> None:
        super().__init__(inner, path=path, text_first=text_first, technique="TokenMerging")
        if mode not in MERGE_MODES:
            raise ValueError(f"TokenMerging mode must be one of {MERGE_MODES}, got {mode!r}")
        self.context = context
        self.ratio, self.sx, self.sy, self.mode = ratio, sx, sy, mode
        self.seed = seed

    def plan(self) -> JointCompute | None:
        grid = self.context.image_grid()
        r = math.floor(grid[0] * grid[1] * self.ratio)
        if r == 0 or grid[0] < self.sy or grid[1] < self.sx:
            return None
        return lambda q, k, v, call: self._merged(grid, r, q, k, v, call)

    def _merged(
        self, grid: Pair, r: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: dict[str, Any]
    ) -> torch.Tensor:
        x = self.inputs(grid, q, k, v, call)
        _, image_keys = split_tokens(x.k, x.num_text, self.text_first)
        match = match_image_keys(image_keys, grid, self.sx, self.sy, self.seed)
        out = merged_joint_attention(
            x.q,
            x.k,
            x.v,
            plan_merge(match, r),
            num_text=x.num_text,
            text_first=self.text_first,
            mode=self.mode,
            scale=x.scale,
        )
        return x.output(out)
