"""Tiny FLUX and SD3 DiTs in the real ComfyUI, built from diffusers twins' weights, for the DiT node tests.

ComfyUI loads the twin's diffusers state dict itself (``comfy.sd.load_diffusion_model_state_dict``: its own
model detection and diffusers-to-ComfyUI key map), so both sides hold the same weights by ComfyUI's converter.
Its detection fixes FLUX's head width at 128 (RoPE axes 16, 56, 56) and SD3's at 64 (hidden = 64 x depth), so
the twins keep those widths with two heads and two blocks of each kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

import attnsurgery as surg

from .parity import capture_first_call

CHANNELS = 16  # latent channels of both families
LATENT_SIZE = 16  # a 16 x 16 latent: an 8 x 8 token grid after the 2 x 2 patches
TEXT_DIM, POOLED_DIM, TEXT_TOKENS = 32, 32, 5


@dataclass
class TinyDit:
    """A ComfyUI ModelPatcher, its diffusers twin, two conditionings and the family ("flux", "sd3", "sd35")."""

    family: str
    model: Any
    twin: torch.nn.Module
    positive: list
    negative: list


def _twin(family: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "flux":
        twin = FluxTransformer2DModel(
            patch_size=1,
            in_channels=CHANNELS * 4,  # diffusers' FLUX takes the 2 x 2 patches packed into channels
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=128,
            num_attention_heads=2,
            joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=POOLED_DIM,
            axes_dims_rope=(16, 56, 56),
        )
    else:  # sd3; sd35: RMS qk-norm and SD3.5's dual attention (an image-only attn2) in the first block
        dual = dict(qk_norm="rms_norm", dual_attention_layers=(0,)) if family == "sd35" else {}
        twin = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=CHANNELS,
            out_channels=CHANNELS,
            num_layers=2,
            attention_head_dim=64,
            num_attention_heads=2,
            joint_attention_dim=TEXT_DIM,
            caption_projection_dim=128,
            pooled_projection_dim=POOLED_DIM,
            pos_embed_max_size=32,
            **dual,
        )
    return twin.eval()


def _conditioning(seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    pooled = torch.randn(1, POOLED_DIM, generator=generator)
    return [[torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=generator), {"pooled_output": pooled}]]


def build(family: str, seed: int = 0) -> TinyDit:
    """The twin of ``family`` and the ComfyUI model ComfyUI loads from its state dict (float32)."""
    import comfy.sd

    twin = _twin(family, seed)
    model = comfy.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in twin.state_dict().items()})
    expected = "Flux" if family == "flux" else "OpenAISignatureMMDITWrapper"
    if type(model.model.diffusion_model).__name__ != expected or model.model.manual_cast_dtype is not None:
        raise RuntimeError(f"ComfyUI loaded the tiny {family} as {type(model.model.diffusion_model).__name__}")
    return TinyDit(family, model, twin, _conditioning(5), _conditioning(6))


def first_call(tiny: TinyDit, model: Any) -> dict:
    """Input, sigma and predictions of the first step of a 2-step cfg-1 run of ``model`` (after every patch)."""
    return capture_first_call(tiny, model, size=LATENT_SIZE, channels=CHANNELS)


def twin_prediction(tiny: TinyDit, call: dict, *plugins: surg.Plugin) -> torch.Tensor:
    """The twin's denoised conditional prediction at ``call`` (flow: x - sigma * v), with ``plugins`` applied."""
    x, sigma = call["input"], call["sigma"]
    context, pooled = tiny.positive[0][0], tiny.positive[0][1]["pooled_output"]
    batch, channels, height, width = x.shape
    with torch.inference_mode(), surg.patched(tiny.twin, *plugins):
        if tiny.family == "flux":
            rows, cols = height // 2, width // 2
            patches = x.view(batch, channels, rows, 2, cols, 2).permute(0, 2, 4, 1, 3, 5)
            packed = patches.reshape(batch, rows * cols, channels * 4)
            ids = torch.zeros(rows, cols, 3)
            ids[..., 1], ids[..., 2] = torch.arange(rows)[:, None], torch.arange(cols)[None]
            v = tiny.twin(
                packed,
                encoder_hidden_states=context,
                pooled_projections=pooled,
                timestep=sigma,
                img_ids=ids.view(-1, 3),
                txt_ids=torch.zeros(context.shape[1], 3),
            ).sample
            v = v.view(batch, rows, cols, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(x.shape)
        else:
            v = tiny.twin(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=sigma * 1000).sample
    return x - sigma.view(-1, 1, 1, 1) * v
