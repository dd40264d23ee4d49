"""Perturbed-attention guidance (PAG, SoftPAG, SEG-like kinds) on single U-Net heads, as a ComfyUI node.

A post-CFG function runs one extra conditional pass in which the chosen heads' self-attention is perturbed
(an attn1 replace patch on a copy of the call's model_options) and adds ``scale * (cond - perturbed)``. The
perturbation itself is :func:`attnsurgery.ops.perturb.perturb_heads`; the settings are validated by the
:class:`~attnsurgery.plugins.perturbation.PerturbedAttention` plugin config.
"""

from __future__ import annotations

from typing import Any

import torch

from ..ops.perturb import KINDS, perturb_heads
from ..plugins.perturbation import PerturbedAttention
from .node import ModelPatchNode
from .patching import (
    DIT_LIMITATION,
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


def _head_replace(heads: list[int], soft: float, kind: str, temperature: float | None):
    """An attn1 replace patch: ComfyUI's attention, then ``perturb_heads`` on the chosen heads of every row."""

    def replace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        n_heads = extra_options["n_heads"]
        out = split_heads(comfy_attention(q, k, v, extra_options), n_heads)
        q, k, v = (split_heads(t, n_heads) for t in (q, k, v))
        batch = q.shape[0]
        rows = torch.arange(batch, device=q.device).repeat_interleave(len(heads))
        head_index = torch.tensor(heads, device=q.device).repeat(batch)
        weights = torch.full((rows.numel(),), soft, device=q.device)
        return merge_heads(perturb_heads(q, k, v, out, rows, head_index, weights, kind, temperature=temperature))

    return replace


class AttnSurgeryPerturbedAttention(ModelPatchNode):
    """Perturbed-attention guidance on chosen heads of chosen U-Net self-attention layers."""

    DESCRIPTION = (
        "Perturbed-attention guidance at head level: one extra conditional pass with the chosen heads' "
        "self-attention perturbed; adds scale * (cond - perturbed). " + DIT_LIMITATION
    )

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
                    "and 3), groups ('top', 'mid', 'down', 'up', 'all'), globs ('*' "
                    "within one path segment, '**' across), or a JSON head set such "
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
    ) -> tuple[Any]:
        """Clone ``model`` and register the guidance; ``(model,)`` unchanged when scale or soft is 0."""
        config = PerturbedAttention(
            scale=scale,
            soft=soft,
            kind=kind,
            start=start_percent,
            stop=end_percent,
            temperature=temperature if kind == "temperature" else None,
        )
        selected = select_heads(unet_attention_sites(model), heads, model_family(model))
        patched = model.clone()
        if config.scale == 0.0 or config.soft == 0.0:
            return (patched,)
        sigma_start, sigma_end = sigma_window(model, config.start, config.stop)
        replaces = {
            site.key: _head_replace(chosen, config.soft, config.kind, config.temperature)
            for site, chosen in selected.items()
        }

        def post_cfg(args: dict) -> torch.Tensor:
            denoised = args["denoised"]
            if not sigma_end <= current_sigma(args["sigma"]) <= sigma_start:
                return denoised
            options = with_attn1_replace(args["model_options"], replaces)
            perturbed = conditional_prediction(args["model"], args["cond"], args["input"], args["sigma"], options)
            return denoised + (args["cond_denoised"] - perturbed) * config.scale

        # The guidance needs the conditional prediction alone: at CFG 1 ComfyUI may skip the unconditional pass.
        patched.set_model_sampler_post_cfg_function(post_cfg)
        return (patched,)
