"""Shared by the parity tests: the diffusers twin of the tiny ComfyUI U-Net and one-step predictions of both."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

import attnsurgery as surg

from .tiny_comfy import CONTEXT_DIM, MODEL_CHANNELS, sample


def diffusers_twin() -> UNet2DConditionModel:
    """The diffusers U-Net of the tiny SD1.5 layout (same levels, heads and widths)."""
    channels = tuple(MODEL_CHANNELS * m for m in (1, 2, 4, 4))
    return UNet2DConditionModel(
        block_out_channels=channels,
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=CONTEXT_DIM,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        norm_num_groups=32,
    )


def diffusers_twin_sdxl() -> UNet2DConditionModel:
    """The diffusers U-Net of the tiny SDXL layout (same levels, heads, widths and added conditioning)."""
    channels = tuple(MODEL_CHANNELS * m for m in (1, 2, 4))
    return UNet2DConditionModel(
        block_out_channels=channels,
        layers_per_block=2,
        attention_head_dim=tuple(max(1, c // 64) for c in channels),
        cross_attention_dim=CONTEXT_DIM,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
        norm_num_groups=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def capture_first_call(tiny, model, steps: int = 2, **sample_options) -> dict:
    """Input, sigma and predictions of the first (sigma_max) step of a cfg-1 run of ``steps``, after every patch."""
    calls = []

    def capture(args):
        calls.append({k: args[k] for k in ("input", "sigma", "denoised", "cond_denoised")})
        return args["denoised"]

    model = model.clone()
    model.set_model_sampler_post_cfg_function(capture)  # runs after the node's own post-CFG functions
    sample(model, tiny.positive, tiny.negative, steps=steps, cfg=1.0, **sample_options)
    return calls[0]


def diffusers_prediction(
    tiny, call: dict, plugin: surg.Plugin | None = None, twin: UNet2DConditionModel | None = None, **unet_kwargs
) -> torch.Tensor:
    """The denoised conditional prediction of the diffusers twin (ComfyUI's weights) at that call.

    ``twin`` defaults to the SD1.5 one; ``unet_kwargs`` go to its forward (ControlNet residuals, SDXL's
    added conditioning).
    """
    import comfy.utils

    twin = twin or diffusers_twin()
    comfy_state = tiny.model.model.diffusion_model.state_dict()
    key_map = comfy.utils.unet_to_diffusers(tiny.model.model.model_config.unet_config)
    twin.load_state_dict({name: comfy_state[key_map[name]] for name in twin.state_dict()})
    x, sigma = call["input"], call["sigma"].view(-1, 1, 1, 1)
    with torch.inference_mode():
        unet_in = x / (sigma**2 + 1) ** 0.5
        timestep = tiny.model.model.model_sampling.timestep(call["sigma"]).float()
        with surg.patched(twin.eval(), *([plugin] if plugin else [])):
            eps = twin(unet_in, timestep, encoder_hidden_states=tiny.positive[0][0], **unet_kwargs).sample
    return x - sigma * eps
