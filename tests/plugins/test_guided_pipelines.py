"""Guidance plugins refuse pipelines whose classifier-free-guidance layout the wrapper cannot see (issue 17,
point 6): guiding them would perturb the wrong rows without a word."""

from __future__ import annotations

import inspect
import types

import diffusers
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLInstructPix2PixPipeline,
)

import attnsurgery as surg
from attnsurgery import PerturbedAttention
from attnsurgery.perturbation.guidance import GUIDED_PIPELINES
from attnsurgery.testing import assert_restored, snapshot
from attnsurgery.testing.tiny import tiny_sd15, tiny_sdxl
from tests.support import guided_pipes


def _upscale() -> StableDiffusionUpscalePipeline:
    """No do_classifier_free_guidance property: the wrapper took every row as conditional."""
    sd15 = tiny_sd15(in_channels=7)  # 4 latent + 3 low-resolution image channels
    parts = {name: sd15.components[name] for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    return StableDiffusionUpscalePipeline(**parts, low_res_scheduler=DDPMScheduler())


def _sdxl_pix2pix() -> StableDiffusionXLInstructPix2PixPipeline:
    """Its CFG flag is a local variable of __call__, and it batches three parts (prompt, image, neither)."""
    names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    sdxl = tiny_sdxl()
    return StableDiffusionXLInstructPix2PixPipeline(**{name: sdxl.components[name] for name in names})


def _sd_pix2pix() -> StableDiffusionInstructPix2PixPipeline:
    """It has the property, but batches [cond, image-only, uncond]: even batches would pass unnoticed."""
    return StableDiffusionInstructPix2PixPipeline(**tiny_sd15(in_channels=8).components)


@pytest.mark.parametrize("build", [_upscale, _sdxl_pix2pix, _sd_pix2pix], ids=["upscale", "sdxl-pix2pix", "pix2pix"])
def test_pipelines_whose_guidance_we_cannot_see_are_refused(build):
    pipe = build()
    before = snapshot(pipe)
    name = type(pipe).__name__
    with pytest.raises(NotImplementedError, match=rf"{name}.*guidance plugins support .*StableDiffusionXLPipeline"):
        surg.apply(pipe, PerturbedAttention())
    assert not surg.active_surgeries(pipe)
    assert_restored(pipe, before)
    surg.apply(pipe, surg.TokenMerging()).remove()  # plugins that leave the guidance alone still apply


def test_a_stand_in_pipeline_must_declare_its_cfg_flag():
    """Objects that are not diffusers pipelines (a benchmark's stand-in) say whether CFG runs by the property."""
    unet = tiny_sd15().unet
    with pytest.raises(NotImplementedError, match="do_classifier_free_guidance"):
        surg.apply(types.SimpleNamespace(unet=unet), PerturbedAttention())
    surg.apply(types.SimpleNamespace(unet=unet, do_classifier_free_guidance=True), PerturbedAttention()).remove()
    surg.apply(unet, PerturbedAttention()).remove()  # a bare denoiser: every row is conditional, as documented


@pytest.mark.parametrize("name", sorted(GUIDED_PIPELINES["uncond_cond"]))
def test_listed_batched_pipelines_still_batch_uncond_then_cond(name):
    """Guards the list against diffusers changes: each pipeline reads its CFG flag from the property the
    wrapper reads, and doubles its latents for one [uncond, cond] batch."""
    pipeline = getattr(diffusers, name)
    assert isinstance(inspect.getattr_static(pipeline, "do_classifier_free_guidance"), property)
    source = inspect.getsource(pipeline.__call__)
    assert "[latents] * 2" in source and "[latents] * 3" not in source


# ------------------------------------------------------------------------------ supported variants
def _guided(pipe, name: str, cfg: bool, mode: str = "batched") -> torch.Tensor:
    """Every layer (the tiny U-Net's mid block sees one token at 64 px, where the identity changes nothing)."""
    with surg.patched(pipe, PerturbedAttention(scale=2.0, layers="all", mode=mode)):
        return guided_pipes.latents(pipe, name, cfg)


@pytest.mark.parametrize("name", sorted(guided_pipes.VARIANTS))
def test_variants_are_guided_on_the_conditional_rows_and_restored(name):
    """One flow-matching or DDIM step is linear in the prediction, so s (eps_c - eps_p) must reach the latents
    unscaled by the CFG weight: with CFG on and off the term is the same only when the conditional rows were
    perturbed and the unconditional prediction got the same shift (a ControlNet's residuals, Kontext's
    reference tokens, Fill's mask channels and the depth channel travel with the rows). Batched equals
    sequential, and remove() restores the pipeline exactly."""
    pipe = guided_pipes.build(name)
    variant = guided_pipes.VARIANTS[name]
    plain = guided_pipes.latents(pipe, name, cfg=False)
    before = snapshot(pipe)  # after a first run, which sets diffusers' and transformers' own caches
    term = _guided(pipe, name, False) - plain
    assert term.abs().max() > 1e-2
    sequential = _guided(pipe, name, False, "sequential") - plain
    torch.testing.assert_close(sequential, term, atol=1e-5, rtol=1e-4)
    if variant.cfg is not None:
        for mode in ("batched", "sequential"):
            cfg_plain = guided_pipes.latents(pipe, name, cfg=True)
            assert (cfg_plain - plain).abs().max() > 1e-3, "CFG must act, or on and off compare one run"
            term_cfg = _guided(pipe, name, True, mode) - cfg_plain
            torch.testing.assert_close(term_cfg, term, atol=1e-5, rtol=1e-4)
    assert_restored(pipe, before)
    assert torch.equal(guided_pipes.latents(pipe, name, cfg=False), plain)


@pytest.mark.parametrize(
    "plugin",
    [
        surg.TokenMerging(),
        surg.AgentAttention(),
        surg.NeighborhoodAttention(),
        PerturbedAttention(layers="all", joint="image_only"),
    ],
    ids=["tome", "agent", "neighborhood", "pag-image-only"],
)
def test_one_grid_plugins_refuse_kontext_reference_tokens(plugin):
    """FluxKontextPipeline appends the reference image's tokens after the target's: plugins that lay one grid
    over the image tokens took the reference's (or a mix) for the image without a word. They stop naming the
    target grid (read from the target's position ids, whatever the reference size) and the fix, and run
    as before without a reference image."""
    pipe = guided_pipes.build("flux-kontext")
    pipe.transformer.register_to_config(sample_size=4)  # native 32 px: 64 px is above it, so every plugin acts
    plain = guided_pipes.latents(pipe, "flux-kontext", cfg=False, image=None)
    before = snapshot(pipe)
    with surg.patched(pipe, plugin):
        message = r"holds 80 tokens, but the image it denoises is a 4x4 grid of 16.*FluxKontextPipeline.*without a"
        with pytest.raises(NotImplementedError, match=message):
            guided_pipes.latents(pipe, "flux-kontext", cfg=False, image=guided_pipes.image(128))
        assert not torch.equal(guided_pipes.latents(pipe, "flux-kontext", cfg=False, image=None), plain)
    assert_restored(pipe, before)
