"""Perturbed-attention node vs the diffusers plugin: the same guided prediction on the same U-Net and heads."""

from __future__ import annotations

import torch

import attnsurgery as surg
from attnsurgery.comfy.perturbed_attention import AttnSurgeryPerturbedAttention
from tests.support.comfy.parity import capture_first_call, diffusers_prediction

HEADS = [
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1:0",
    "mid_block.attentions.0.transformer_blocks.0.attn1:3",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn1:5",
]


def test_guided_prediction_matches_the_diffusers_plugin(tiny):
    (guided,) = AttnSurgeryPerturbedAttention().patch(tiny.model, 3.0, " ".join(HEADS), 1.0, "identity", 2.0, 0, 1)
    call = capture_first_call(tiny, guided)
    # float32 rounding of x - sigma * eps at sigma_max ~14.6 (|x| ~ 50): about 1e-4 apart
    assert torch.allclose(diffusers_prediction(tiny, call), call["cond_denoised"], rtol=0, atol=1e-3)
    effect = (call["denoised"] - call["cond_denoised"]).abs().max()
    assert effect > 0.5  # the guidance term is not negligible (about 2.7 here)
    plugin = surg.PerturbedAttention(scale=3.0, heads=HEADS, mode="sequential")
    assert torch.allclose(diffusers_prediction(tiny, call, plugin), call["denoised"], rtol=0, atol=1e-3)
