"""Our layer-level PAG equals diffusers' PAG pipelines built from the same components (same layers, scales, seed)."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import StableDiffusion3PAGPipeline, StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline

import attnsurgery as surg
from attnsurgery.testing.tiny import tiny_sd3, tiny_sd15, tiny_sdxl


def _latents(pipe, prompt: str | list[str] = "a red cube", **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, generator=generator, output_type="latent", num_inference_steps=2, **kwargs).images


def _pag_pipeline(cls, pipe, layers: str):
    """diffusers' PAG pipeline sharing `pipe`'s modules (it restores the processors after each call)."""
    accepted = inspect.signature(cls).parameters
    pag = cls(**{k: v for k, v in pipe.components.items() if k in accepted}, pag_applied_layers=[layers])
    pag.set_progress_bar_config(disable=True)
    return pag


def _assert_parity(pipe, pag, plugin, **kwargs) -> None:
    plain = _latents(pipe, **kwargs)
    reference = _latents(pag, pag_scale=plugin.scale, **kwargs)
    assert (reference - plain).abs().max() > 1e-2, "PAG has no effect here: the comparison would prove nothing"
    with surg.patched(pipe, plugin):
        ours = _latents(pipe, **kwargs)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def sd15():
    pipe = tiny_sd15()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_sd15_mid_block_matches_diffusers_pag(sd15, guidance_scale):
    """192 px: the mid block holds 3 x 3 tokens (at 64 px it holds one, where PAG changes nothing)."""
    pag = _pag_pipeline(StableDiffusionPAGPipeline, sd15, "mid")
    _assert_parity(sd15, pag, surg.PerturbedAttention(scale=3.0), height=192, width=192, guidance_scale=guidance_scale)


def test_sdxl_mid_block_matches_diffusers_pag():
    pipe = tiny_sdxl()
    pipe.set_progress_bar_config(disable=True)
    pag = _pag_pipeline(StableDiffusionXLPAGPipeline, pipe, "mid")
    _assert_parity(pipe, pag, surg.PerturbedAttention(scale=3.0), height=128, width=128, guidance_scale=5.0)


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_sd3_image_only_matches_diffusers_pag(guidance_scale):
    """4 blocks, so diffusers' regex "blocks.1" selects exactly transformer_blocks.1 as ours does; two
    prompts, so that every perturbed row must be perturbed."""
    pipe = tiny_sd3(num_layers=4)
    pipe.set_progress_bar_config(disable=True)
    pag = _pag_pipeline(StableDiffusion3PAGPipeline, pipe, "blocks.1")
    plugin = surg.PerturbedAttention(scale=3.0, layers="transformer_blocks.1", joint="image_only")
    _assert_parity(
        pipe,
        pag,
        plugin,
        height=128,
        width=128,
        guidance_scale=guidance_scale,
        max_sequence_length=16,
        prompt=["a red cube", "a blue ball"],
    )
