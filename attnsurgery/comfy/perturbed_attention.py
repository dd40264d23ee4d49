"""Perturbed-attention guidance (PAG, SoftPAG, SEG-like kinds) on single heads, as a ComfyUI node.

A post-CFG function runs one extra conditional pass in which the chosen heads' attention is perturbed and
adds ``scale * (cond - perturbed)``. The perturbed pass gets its patches on a copy of the call's
model_options: attn1 replace patches on U-Nets, DiT block patches with an attention override on FLUX and
SD3 (:mod:`attnsurgery.comfy.dit`). The perturbation itself is :func:`attnsurgery.ops.perturb.perturb_heads`;
the settings are validated by the :class:`~attnsurgery.plugins.perturbation.PerturbedAttention` plugin config.
"""

from __future__ import annotations

from typing import Any

import torch

from ..ops.perturb import KINDS, perturb_heads
from ..plugins.perturbation import JOINT, PerturbedAttention
from .dit import DitCall, block_patch, dit_family, dit_sites, sites_by_block, with_block_patches
from .node import ModelPatchNode
from .patching import (
    comfy_attention,
    conditional_prediction,
    current_sigma,
    merge_heads,
    model_family,
    select_heads,
    sigma_window,
    split_heads,
    unet_attention_sites,
    with_attn1_replace,
)

__all__ = ["AttnSurgeryPerturbedAttention"]


def _pairs(batch: int, heads: list[int], soft: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(rows, heads, weights) of ``perturb_heads``: the chosen heads of every row (the pass is all conditional)."""
    rows = torch.arange(batch, device=device).repeat_interleave(len(heads))
    head_index = torch.tensor(heads, device=device).repeat(batch)
    return rows, head_index, torch.full((rows.numel(),), soft, device=device)


def _head_replace(heads: list[int], soft: float, kind: str, temperature: float | None):
    """An attn1 replace patch: ComfyUI's attention, then ``perturb_heads`` on the chosen heads of every row."""

    def replace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        n_heads = extra_options["n_heads"]
        out = split_heads(comfy_attention(q, k, v, extra_options), n_heads)
        q, k, v = (split_heads(t, n_heads) for t in (q, k, v))
        pairs = _pairs(q.shape[0], heads, soft, q.device)
        return merge_heads(perturb_heads(q, k, v, out, *pairs, kind, temperature=temperature))

    return replace


def _dit_edit(chosen: dict[str, list[int]], config: PerturbedAttention):
    """The DiT block patches' edit: ``perturb_heads`` on the chosen heads of the attention ComfyUI computed.

    ``joint="image_only"`` keeps the text keys and puts the identity on the image-image block alone.
    """

    def edit(call: DitCall, out: torch.Tensor) -> torch.Tensor:
        if call.mask is not None and config.kind != "identity":
            raise NotImplementedError(
                f"kind={config.kind!r} on {call.site.path} with an attention mask is not supported; use "
                "kind='identity' (it does not depend on the map) or perturb an unmasked layer"
            )
        image = slice(call.num_text, call.q.shape[2]) if config.joint == "image_only" and call.num_text else None
        pairs = _pairs(call.q.shape[0], chosen[call.site.path], config.soft, call.q.device)
        return perturb_heads(
            call.q,
            call.k,
            call.v,
            out,
            *pairs,
            config.kind,
            scale=call.scale,
            temperature=config.temperature,
            image_tokens=image,
            attn_mask=call.mask if image is not None else None,
        )

    return edit


class AttnSurgeryPerturbedAttention(ModelPatchNode):
    """Perturbed-attention guidance on chosen heads of chosen layers: U-Net self-attention, FLUX and SD3 joint,
    single-stream and image-only attention."""

    DESCRIPTION = (
        "Perturbed-attention guidance at head level: one extra conditional pass with the chosen heads' "
        "self-attention perturbed; adds scale * (cond - perturbed). U-Nets (SD1.x, SD2.x, SDXL) and, on "
        "ComfyUI 0.20.1 or newer, FLUX and SD3/SD3.5 (layers in diffusers names, e.g. "
        "'transformer_blocks.1.attn:0,3', 'single_transformer_blocks.10.attn')."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # ComfyUI's name
        joint = (
            list(JOINT),
            {
                "default": "full",
                "tooltip": "DiTs: full perturbs the whole joint text+image attention; image_only keeps the "
                "text keys and puts the identity on the image-image block (diffusers' SD3 PAG; "
                "kind identity only). No effect on U-Nets.",
            },
        )
        return {**super().INPUT_TYPES(), "optional": {"joint": joint}}  # optional: older workflows lack it

    @classmethod
    def inputs(cls) -> dict[str, Any]:
        return {
            "scale": (
                "FLOAT",
                {
                    "default": 3.0,
                    "min": 0.0,
                    "max": 100.0,
                    "step": 0.1,
                    "tooltip": "Guidance scale s (PAG: 3 with CFG 4). 0 turns the node off.",
                },
            ),
            "heads": (
                "STRING",
                {
                    "default": "mid_block",
                    "multiline": True,
                    "tooltip": "Layers and heads in diffusers names, as in the Python API: "
                    "'mid_block' (all heads), 'up_blocks.1.attentions.0:0,3' (heads 0 "
                    "and 3), groups ('top', 'mid', 'down', 'up', 'all'; DiTs: 'all', "
                    "'joint', 'single'), DiT layers such as 'transformer_blocks.1.attn:2' "
                    "or 'single_transformer_blocks.10', globs ('*' within one path "
                    "segment, '**' across), or a JSON head set such "
                    'as {"mid_block.attentions.0.transformer_blocks.0.attn1": [1, 5]}, '
                    "or the path of a head-set file from `attnsurgery hunt`.",
                },
            ),
            "soft": (
                "FLOAT",
                {
                    "default": 1.0,
                    "min": 0.0,
                    "max": 1.0,
                    "step": 0.05,
                    "tooltip": "Blend toward the perturbed map (1 = PAG, below 1 = SoftPAG).",
                },
            ),
            "kind": (
                list(KINDS),
                {
                    "default": "identity",
                    "tooltip": "identity (PAG), uniform, mean_query (SEG, infinite blur) or temperature.",
                },
            ),
            "temperature": (
                "FLOAT",
                {
                    "default": 2.0,
                    "min": 0.01,
                    "max": 100.0,
                    "step": 0.1,
                    "tooltip": "tau of kind=temperature (tau > 1 flattens the map).",
                },
            ),
            "start_percent": (
                "FLOAT",
                {
                    "default": 0.0,
                    "min": 0.0,
                    "max": 1.0,
                    "step": 0.01,
                    "tooltip": "Denoising percent at which the guidance starts.",
                },
            ),
            "end_percent": (
                "FLOAT",
                {
                    "default": 1.0,
                    "min": 0.0,
                    "max": 1.0,
                    "step": 0.01,
                    "tooltip": "Denoising percent at which the guidance stops.",
                },
            ),
        }

    def patch(
        self,
        model: Any,
        scale: float,
        heads: str,
        soft: float,
        kind: str,
        temperature: float,
        start_percent: float,
        end_percent: float,
        joint: str = "full",
    ) -> tuple[Any]:
        """Clone ``model`` and register the guidance; ``(model,)`` unchanged when scale or soft is 0."""
        config = PerturbedAttention(
            scale=scale,
            soft=soft,
            kind=kind,
            start=start_percent,
            stop=end_percent,
            temperature=temperature if kind == "temperature" else None,
            joint=joint,
        )
        perturbing = _perturbing(model, heads, config)
        patched = model.clone()
        if config.scale == 0.0 or config.soft == 0.0:
            return (patched,)
        sigma_start, sigma_end = sigma_window(model, config.start, config.stop)

        def post_cfg(args: dict) -> torch.Tensor:
            denoised = args["denoised"]
            if not sigma_end <= current_sigma(args["sigma"]) <= sigma_start:
                return denoised
            options = perturbing(args["model_options"])
            perturbed = conditional_prediction(args["model"], args["cond"], args["input"], args["sigma"], options)
            return denoised + (args["cond_denoised"] - perturbed) * config.scale

        # The guidance needs the conditional prediction alone: at CFG 1 ComfyUI may skip the unconditional pass.
        patched.set_model_sampler_post_cfg_function(post_cfg)
        return (patched,)


def _perturbing(model: Any, heads: str, config: PerturbedAttention):
    """``model_options -> model_options`` of the perturbed pass: U-Net attn1 replace patches, or DiT block
    patches whose attention override perturbs the chosen heads (each chained around a patch already there).

    Raises:
        ValueError: the spec selects nothing or a head out of range (the message lists the layers).
        NotImplementedError: a DiT this ComfyUI or the pack cannot patch (the message names the fix).
    """
    if hasattr(model.model.diffusion_model, "input_blocks"):  # a U-Net
        selected = select_heads(unet_attention_sites(model), heads, model_family(model))
        replaces = {
            site.key: _head_replace(chosen, config.soft, config.kind, config.temperature)
            for site, chosen in selected.items()
        }
        return lambda options: with_attn1_replace(options, replaces)
    selected = select_heads(dit_sites(model), heads, dit_family(model))
    edit = _dit_edit({site.path: chosen for site, chosen in selected.items()}, config)
    blocks = sites_by_block(list(selected))

    def make(key, previous):
        return block_patch(blocks[key], previous, edit=edit, technique="perturbed attention")

    return lambda options: with_block_patches(options, make, blocks)
