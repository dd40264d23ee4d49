"""Token merging (ToMe for SD) on U-Net self-attention, and ToMe inside the joint attention of FLUX and SD3,
as a ComfyUI node.

The attn1 patch merges the layer's input tokens (bipartite soft matching from
:mod:`attnsurgery.ops.token_merge`), attention runs on the fewer tokens, and the attn1 output patch copies
the results back. The merge plan travels from one patch to the other in that call's ``extra_options`` (a
dict ComfyUI builds per block call), never on the node. ComfyUI hands the patch the normed block input, so
the matching uses it, where the diffusers plugin matches on the raw block input (ToMe for SD's choice).

On DiTs (ComfyUI 0.20.1 or newer) each call of the chosen blocks runs the plugin's own joint-call processor
(:class:`~attnsurgery.processors.joint_merge.JointMergeProcessor`) through a block patch's attention
override: the image keys (after RoPE) are matched and merged, text never, as the plugin does.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..ops.token_merge import match_tokens, plan_merge
from ..plugins.token_merging import TokenMerging
from ..processors.joint_merge import MERGE_MODES, JointMergeProcessor
from .dit import dit_family, dit_sites, patch_joint_processors
from .node import LAYERS_INPUT, SEED_INPUT, ModelPatchNode
from .patching import (
    call_generator,
    claim_token_layers,
    model_family,
    select_heads,
    select_layers,
    token_grid,
    unet_attention_sites,
)

__all__ = ["AttnSurgeryTokenMerging"]

PLAN_KEY = "attnsurgery_token_merge"


def merge_patches(keys: set[tuple[str, int, int]], ratio: float, sx: int, sy: int, seed: int | None):
    """(attn1_patch, attn1_output_patch) merging ``ratio`` of the tokens of the layers in ``keys``."""

    def merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict):
        block, index = extra_options.get("block"), extra_options.get("block_index", 0)
        if block is None or (block[0], block[1], index) not in keys:
            return q, k, v
        if k is not q or v is not q:
            raise NotImplementedError("token merging needs plain self-attention (k and v are q's tokens)")
        h, w = token_grid(extra_options["original_shape"], q.shape[1])
        if h < sy or w < sx or sx * sy == 1:  # no full cell, or every token a dst: nothing to merge
            return q, k, v
        # Odd batches cannot hold matching uncond/cond rows: position 0, as ToMe for SD.
        generator = call_generator(seed, extra_options) if seed is not None and q.shape[0] % 2 == 0 else None
        plan = plan_merge(match_tokens(q, h, w, sx, sy, generator=generator), math.floor(q.shape[1] * ratio))
        extra_options[PLAN_KEY] = plan
        merged = plan.merge(q)
        return merged, merged, merged

    def unmerge(out: torch.Tensor, extra_options: dict) -> torch.Tensor:
        plan = extra_options.pop(PLAN_KEY, None)
        return out if plan is None else plan.unmerge(out)

    return merge, unmerge


class AttnSurgeryTokenMerging(ModelPatchNode):
    """ToMe for SD on chosen U-Net self-attention layers; ToMe on the image tokens of FLUX and SD3 layers."""

    DESCRIPTION = (
        "Token merging (ToMe for SD): merges similar tokens before self-attention and copies the results "
        "back, to save time at large sizes. U-Nets, and on ComfyUI 0.20.1 or newer FLUX and SD3/SD3.5 (image "
        "tokens merged inside the joint attention, text never; layers such as 'all', 'single')."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # ComfyUI's name
        mode = (
            list(MERGE_MODES),
            {
                "default": "qkv",
                "tooltip": "DiTs: qkv merges the image queries too and copies their outputs back (ToMe); kv "
                "merges only the image keys and values (cheaper). U-Nets: qkv only.",
            },
        )
        return {**super().INPUT_TYPES(), "optional": {"mode": mode}}  # optional: older workflows lack it

    @classmethod
    def inputs(cls) -> dict[str, Any]:
        return {
            "ratio": (
                "FLOAT",
                {
                    "default": 0.5,
                    "min": 0.0,
                    "max": 0.95,
                    "step": 0.05,
                    "tooltip": "Fraction of tokens merged away. 0 turns the node off.",
                },
            ),
            "sx": ("INT", {"default": 2, "min": 1, "max": 8, "tooltip": "dst cell width in tokens."}),
            "sy": ("INT", {"default": 2, "min": 1, "max": 8, "tooltip": "dst cell height in tokens."}),
            "layers": LAYERS_INPUT,
            "seed": SEED_INPUT,
        }

    def patch(
        self, model: Any, ratio: float, sx: int, sy: int, layers: str, seed: int, mode: str = "qkv"
    ) -> tuple[Any]:
        """Clone ``model`` and register the merge/unmerge patches; ``(clone,)`` untouched when ratio is 0."""
        config = TokenMerging(
            ratio=ratio, sx=sx, sy=sy, use_rand=seed >= 0, seed=seed if seed >= 0 else None, mode=mode
        )
        if not hasattr(model.model.diffusion_model, "input_blocks"):
            return (_patch_dit(model, config, layers),)
        if config.mode == "kv":
            raise ValueError("TokenMerging mode='kv' merges keys inside a DiT's joint attention; on a U-Net use qkv")
        keys = select_layers(unet_attention_sites(model), layers, model_family(model))
        patched = model.clone()
        if config.ratio == 0.0:
            return (patched,)
        claim_token_layers(patched, keys, "TokenMerging")
        merge, unmerge = merge_patches(keys, config.ratio, config.sx, config.sy, config.seed)
        patched.set_model_attn1_patch(merge)
        patched.set_model_attn1_output_patch(unmerge)
        return (patched,)


def _patch_dit(model: Any, config: TokenMerging, layers: str) -> Any:
    """The clone of a FLUX or SD3 model with the plugin's joint-call merging on the chosen layers."""
    selected = list(select_heads(dit_sites(model), layers, dit_family(model)))
    if config.ratio == 0.0:
        return model.clone()

    def make(inner, site, clock, seed) -> JointMergeProcessor:
        return JointMergeProcessor(
            inner,
            path=site.path,
            text_first=True,  # ComfyUI's Flux and MMDiT put the text first in every joint call
            context=clock,
            ratio=config.ratio,
            sx=config.sx,
            sy=config.sy,
            mode=config.mode,
            seed=seed,
        )

    seed = config.seed if config.use_rand else None
    return patch_joint_processors(model, selected, make, seed, "TokenMerging")
