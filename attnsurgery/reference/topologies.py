"""The two reference topologies the one trainer knows: what is built, trained, saved and learned.

A topology names its pipeline builder, the modules that train (the denoiser and its text encoders), the
weights' save and load functions, and its denoising objective: the U-Net reference learns epsilon or
velocity prediction on DDPM noise levels with min-SNR weighting; the reference DiT learns rectified flow
(velocity ``noise - x0`` on straight paths) at logit-normal noise levels, shifted as its scheduler shifts
the native resolution's sampling schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline, StableDiffusionPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from attnsurgery.reference.flux_model import (
    NATIVE_SIZE,
    TEXT_TOKENS,
    build_reference_flux_pipeline,
    load_reference_flux_pipeline,
    save_reference_flux_weights,
)
from attnsurgery.reference.model import build_reference_pipeline, load_reference_pipeline, save_reference_weights
from attnsurgery.training import min_snr_weights

__all__ = ["TOPOLOGIES", "Topology", "UNetObjective", "RectifiedFlowObjective", "MIN_SNR_GAMMA"]

MIN_SNR_GAMMA = 5.0  # Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"

#: ``loss(pipe, images, captions, generator)``: the training loss of one batch of images in [-1, 1].
Objective = Callable[[Any, torch.Tensor, list[str], torch.Generator], torch.Tensor]


def _encode_clip(pipe: StableDiffusionPipeline, captions: list[str]) -> torch.Tensor:
    ids = pipe.tokenizer(
        captions,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return pipe.text_encoder(ids)[0]


class UNetObjective:
    """Epsilon or velocity prediction on DDPM noise levels, min-SNR weighted (the U-Net reference)."""

    def __init__(self, pipe: StableDiffusionPipeline, prediction_type: str) -> None:
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod
        self.prediction_type = prediction_type
        self.velocity = prediction_type == "v_prediction"

    def __call__(
        self, pipe: StableDiffusionPipeline, images: torch.Tensor, captions: list[str], generator: torch.Generator
    ) -> torch.Tensor:
        with torch.no_grad():
            latents = pipe.vae.encode(images).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, len(self.alphas_cumprod), (latents.shape[0],), generator=generator)
        noisy = pipe.scheduler.add_noise(latents, noise, t)
        pred = pipe.unet(noisy, t, _encode_clip(pipe, captions)).sample
        target = pipe.scheduler.get_velocity(latents, noise, t) if self.velocity else noise
        weights = min_snr_weights(self.alphas_cumprod, t, MIN_SNR_GAMMA, self.prediction_type)
        return (weights * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()


class RectifiedFlowObjective:
    """Rectified flow for the reference DiT: ``x_s = (1 - s) x0 + s noise``, target ``noise - x0``.

    Noise levels are logit-normal (SD3's choice; Esser et al. 2024) and then shifted exactly as FLUX's
    scheduler shifts its sampling sigmas at the native sequence length, so training and sampling agree.
    """

    def __init__(self, pipe: FluxPipeline, prediction_type: str) -> None:
        config = pipe.scheduler.config
        tokens = (NATIVE_SIZE // pipe.vae_scale_factor // 2) ** 2
        # the mu FluxPipeline computes for the native sequence length; the scheduler's own time shift uses it
        self.mu = calculate_shift(
            tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
        )

    def __call__(
        self, pipe: FluxPipeline, images: torch.Tensor, captions: list[str], generator: torch.Generator
    ) -> torch.Tensor:
        vae = pipe.vae
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator)
            latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        b, c, h, w = latents.shape
        x0 = FluxPipeline._pack_latents(latents, b, c, h, w)
        noise = torch.randn(x0.shape, generator=generator)
        u = torch.sigmoid(torch.randn(b, generator=generator))
        sigma = pipe.scheduler.time_shift(self.mu, 1.0, u)
        noisy = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        text, pooled, text_ids = pipe.encode_prompt(captions, None, device=x0.device, max_sequence_length=TEXT_TOKENS)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x0.device, x0.dtype)
        pred = pipe.transformer(
            hidden_states=noisy,
            timestep=sigma,
            pooled_projections=pooled,
            encoder_hidden_states=text,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return (pred - (noise - x0)).pow(2).mean()


@dataclass(frozen=True)
class Topology:
    """One reference model's recipe, as the trainer needs it.

    Attributes:
        name: ``"unet"`` or ``"flux"`` (the trainer's ``--topology``).
        trained: the pipeline attributes that train (the denoiser first, then text encoders).
        build: fresh random-weight pipeline.
        save: ``save(pipe, folder)`` writes fp16 weights and ``config.json``.
        load: ``load(folder)`` reads them back.
        objective: ``objective(pipe, prediction_type)`` -> the loss of one batch.
        description: the model card's opening paragraph.
    """

    name: str
    trained: tuple[str, ...]
    build: Callable[[], Any]
    save: Callable[[Any, Path], None]
    load: Callable[[Path], Any]
    objective: Callable[[Any, str], Objective]
    description: str

    @property
    def denoiser(self) -> str:
        return self.trained[0]


TOPOLOGIES: dict[str, Topology] = {
    "unet": Topology(
        "unet",
        ("unet", "text_encoder"),
        build_reference_pipeline,
        save_reference_weights,
        lambda folder: load_reference_pipeline(weights_dir=folder),
        UNetObjective,
        "A small StableDiffusionPipeline (SD1.x UNet topology, AutoencoderKL of factor 4, CLIP text encoder\n"
        "with the real CLIP BPE tokenizer) trained from scratch on procedural captioned shapes, so that\n"
        "attention-surgery quality is measurable offline. Native size 64 px (16 x 16 latents).",
    ),
    "flux": Topology(
        "flux",
        ("transformer", "text_encoder", "text_encoder_2"),
        build_reference_flux_pipeline,
        save_reference_flux_weights,
        lambda folder: load_reference_flux_pipeline(weights_dir=folder),
        RectifiedFlowObjective,
        "A small FluxPipeline (FLUX.1 topology: double-stream then single-stream blocks, RoPE, true CFG;\n"
        "the U-Net reference's VAE and CLIP text encoder, a small T5 encoder with a word-level tokenizer)\n"
        "trained with rectified flow on procedural captioned shapes, so that DiT attention surgery is\n"
        f"measurable offline. Native size 64 px (8 x 8 image tokens, {TEXT_TOKENS} text tokens).",
    ),
}
