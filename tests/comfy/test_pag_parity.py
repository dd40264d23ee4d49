"""The perturbed-attention node and the diffusers plugin give the same guided prediction on the same U-Net."""

from __future__ import annotations

import torch

import attnsurgery as surg
from attnsurgery.comfy.perturbed_attention import AttnSurgeryPerturbedAttention

from .test_patching import diffusers_twin
from .tiny_comfy import sample

HEADS = ["up_blocks.1.attentions.0.transformer_blocks.0.attn1:0", "mid_block.attentions.0.transformer_blocks.0.attn1:3",
         "down_blocks.1.attentions.1.transformer_blocks.0.attn1:5"]


def _converted_twin(model):
    """The diffusers U-Net holding the ComfyUI model's weights (ComfyUI's own key map)."""
    import comfy.utils

    twin = diffusers_twin()
    comfy_state = model.model.diffusion_model.state_dict()
    key_map = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    twin.load_state_dict({name: comfy_state[key_map[name]] for name in twin.state_dict()})
    return twin.eval()


def test_guided_prediction_matches_the_diffusers_plugin(tiny):
    captured = {}

    def capture(args):
        captured.setdefault("calls", []).append({k: args[k] for k in ("input", "sigma", "denoised", "cond_denoised")})
        return args["denoised"]

    (guided,) = AttnSurgeryPerturbedAttention().patch(tiny.model, 3.0, " ".join(HEADS), 1.0, "identity", 2.0, 0, 1)
    guided = guided.clone()
    guided.set_model_sampler_post_cfg_function(capture)  # runs after the guidance: sees its result
    sample(guided, tiny.positive, tiny.negative, steps=2, cfg=1.0)
    call = captured["calls"][0]  # the first step: sigma_max, where the guidance term is largest
    x, sigma = call["input"], call["sigma"]

    twin = _converted_twin(tiny.model)
    model_sampling = tiny.model.model.model_sampling
    with torch.inference_mode():
        unet_in = x / (sigma.view(-1, 1, 1, 1) ** 2 + 1) ** 0.5
        timestep = model_sampling.timestep(sigma).float()
        cond = tiny.positive[0][0]
        plain = twin(unet_in, timestep, encoder_hidden_states=cond).sample
        with surg.patched(twin, surg.PerturbedAttention(scale=3.0, heads=HEADS, mode="sequential")):
            eps = twin(unet_in, timestep, encoder_hidden_states=cond).sample
    sigma4 = sigma.view(-1, 1, 1, 1)
    # float32 rounding of x - sigma * eps at sigma_max ~14.6 (|x| ~ 50): about 1e-4 apart
    assert torch.allclose(x - sigma4 * plain, call["cond_denoised"], rtol=0, atol=1e-3)  # same U-Net, same call
    effect = (call["denoised"] - call["cond_denoised"]).abs().max()
    assert effect > 0.5  # the guidance term is not negligible (about 2.7 here)
    assert torch.allclose(x - sigma4 * eps, call["denoised"], rtol=0, atol=1e-3)
