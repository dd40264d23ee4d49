"""The nodes and the diffusers plugins give the same prediction on the same U-Net where the maths is identical."""

from __future__ import annotations

import torch

import attnsurgery as surg
from attnsurgery.comfy.perturbed_attention import AttnSurgeryPerturbedAttention

from .test_patching import diffusers_twin
from .tiny_comfy import sample

HEADS = ["up_blocks.1.attentions.0.transformer_blocks.0.attn1:0", "mid_block.attentions.0.transformer_blocks.0.attn1:3",
         "down_blocks.1.attentions.1.transformer_blocks.0.attn1:5"]


def capture_first_call(tiny, model) -> dict:
    """Input, sigma and predictions of the first (sigma_max) step of a cfg-1 run, after every patch."""
    calls = []

    def capture(args):
        calls.append({k: args[k] for k in ("input", "sigma", "denoised", "cond_denoised")})
        return args["denoised"]

    model = model.clone()
    model.set_model_sampler_post_cfg_function(capture)  # runs after the node's own post-CFG functions
    sample(model, tiny.positive, tiny.negative, steps=2, cfg=1.0)
    return calls[0]


def diffusers_prediction(tiny, call: dict, plugin: surg.Plugin | None = None) -> torch.Tensor:
    """The denoised conditional prediction of the diffusers twin (ComfyUI's weights) at that call."""
    import comfy.utils

    twin = diffusers_twin()
    comfy_state = tiny.model.model.diffusion_model.state_dict()
    key_map = comfy.utils.unet_to_diffusers(tiny.model.model.model_config.unet_config)
    twin.load_state_dict({name: comfy_state[key_map[name]] for name in twin.state_dict()})
    x, sigma = call["input"], call["sigma"].view(-1, 1, 1, 1)
    with torch.inference_mode():
        unet_in = x / (sigma**2 + 1) ** 0.5
        timestep = tiny.model.model.model_sampling.timestep(call["sigma"]).float()
        with surg.patched(twin.eval(), *([plugin] if plugin else [])):
            eps = twin(unet_in, timestep, encoder_hidden_states=tiny.positive[0][0]).sample
    return x - sigma * eps


def test_guided_prediction_matches_the_diffusers_plugin(tiny):
    (guided,) = AttnSurgeryPerturbedAttention().patch(tiny.model, 3.0, " ".join(HEADS), 1.0, "identity", 2.0, 0, 1)
    call = capture_first_call(tiny, guided)
    # float32 rounding of x - sigma * eps at sigma_max ~14.6 (|x| ~ 50): about 1e-4 apart
    assert torch.allclose(diffusers_prediction(tiny, call), call["cond_denoised"], rtol=0, atol=1e-3)
    effect = (call["denoised"] - call["cond_denoised"]).abs().max()
    assert effect > 0.5  # the guidance term is not negligible (about 2.7 here)
    plugin = surg.PerturbedAttention(scale=3.0, heads=HEADS, mode="sequential")
    assert torch.allclose(diffusers_prediction(tiny, call, plugin), call["denoised"], rtol=0, atol=1e-3)
