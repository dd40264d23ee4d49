"""Tiny pipelines of every DiT family, told they were trained at 64 px, for the tests of the DiT plugins."""

from __future__ import annotations

import torch

from attnsurgery.testing.tiny import (
    tiny_chroma,
    tiny_flux,
    tiny_flux2,
    tiny_qwenimage,
    tiny_sd3,
    tiny_sd35,
    tiny_zimage,
)

NATIVE_PX = 64  # the tiny models are told they were trained at 64 px, so 128 px is 2x native
#: family -> (builder, pipeline kwargs): with CFG where the pipeline has it (separate calls, masks, list batches)
FAMILIES = {
    "sd3": (lambda: tiny_sd3(num_layers=2), dict(guidance_scale=4.0)),
    "sd35": (tiny_sd35, dict(guidance_scale=4.0)),
    "flux": (tiny_flux, dict(true_cfg_scale=4.0, negative_prompt="blurry")),
    "flux2": (tiny_flux2, dict(guidance_scale=4.0)),
    "qwenimage": (tiny_qwenimage, dict(true_cfg_scale=4.0, negative_prompt="blurry")),
    "zimage": (tiny_zimage, dict(guidance_scale=4.0)),
    "chroma": (tiny_chroma, dict(guidance_scale=4.0, negative_prompt="blurry")),
}


def denoiser(pipe) -> torch.nn.Module:
    return pipe.transformer


def build(name: str):
    builder, _ = FAMILIES[name]
    pipe = builder()
    pipe.set_progress_bar_config(disable=True)
    # Native size is read from the config's sample_size (latent cells); 64 px keeps every test small.
    denoiser(pipe).register_to_config(sample_size=NATIVE_PX // pipe.vae_scale_factor)
    return pipe


def latents(pipe, name: str = "flux", size: int = 2 * NATIVE_PX, steps: int = 2, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    extra = {**FAMILIES[name][1], **kwargs}
    return pipe(
        prompt="a red cube",
        generator=generator,
        max_sequence_length=16,
        height=size,
        width=size,
        num_inference_steps=steps,
        output_type="latent",
        **extra,
    ).images
