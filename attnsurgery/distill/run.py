"""``distill()``: a whole distillation run on a pipeline, from its checks to the saved blocks.

It refuses what it cannot distil (a bare denoiser, an already modified model, a DiT or inpainting UNet),
turns the data into latents with the unmodified teacher, applies a fresh ConvFusion through the surgery,
trains it, saves it, and puts the pipeline back as it was (surgery removed, weights frozen again,
gradient checkpointing as before).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..convfusion import ConvFusion
from ..convfusion.format import architecture_fingerprint
from ..families import detect_family
from ..surgery import active_surgeries, apply, resolve_target
from .config import DistillConfig
from .data import prepare_latents
from .resume import resume_point
from .trainer import Trainer, teacher_sharing_weights

__all__ = ["DistillResult", "distill"]


@dataclass(frozen=True)
class DistillResult:
    """What a run produced: the trained blocks as a plugin, the per-step losses of this run, the folder."""

    plugin: ConvFusion
    history: list[dict[str, float]]
    folder: Path


def distill(
    target: Any,
    data: str | Path,
    out: str | Path,
    config: DistillConfig = DistillConfig(),  # noqa: B008 (frozen, so one shared default is safe)
    *,
    resume: bool = False,
) -> DistillResult:
    """Distil ``target``'s self-attention into ConvFusion blocks and save them into ``out``.

    The pipeline is moved to the accelerator's device and restored otherwise: its weights stay frozen and
    untouched, the surgery is removed at the end, gradient checkpointing and ``requires_grad`` flags are
    put back.

    Args:
        target: a diffusers SD1.x/SD2.x/SDXL pipeline (text encoders and VAE are needed for the data).
        data: a prompts file (one per line; the teacher generates and caches the latents), a folder of
            captioned images (``<name>.txt`` or ``metadata.jsonl``), or a folder of latent shards.
        out: output folder: ``convfusion.safetensors`` + ``convfusion.json``, ``checkpoints/``, the latent
            cache and ``log.jsonl``.
        config: training settings.
        resume: continue from the latest checkpoint in ``out`` (settings must match it).

    Returns:
        The trained blocks as a ``ConvFusion`` plugin (loaded from ``out``), this run's losses, ``out``.

    Example:
        >>> result = distill(pipe, "prompts.txt", "out", DistillConfig(steps=20_000))  # doctest: +SKIP
    """
    from accelerate import Accelerator

    pipe, denoiser = resolve_target(target)
    if pipe is None or not hasattr(pipe, "encode_prompt"):
        raise ValueError("distill needs the whole pipeline (text encoders, VAE, scheduler), not a bare denoiser.")
    if active_surgeries(denoiser):
        raise ValueError(
            "Remove the surgeries applied to this pipeline before distilling (attnsurgery.remove); "
            "the teacher must be the unmodified model."
        )
    family = detect_family(denoiser, getattr(pipe, "vae_scale_factor", None))
    if family.kind != "unet" or family.inpaint:
        raise NotImplementedError(
            f"ConvFusion distillation supports SD1.x/SD2.x/SDXL text-to-image UNets, "
            f"not {family.name}{' (inpainting)' if family.inpaint else ''}."
        )
    out, data = Path(out), Path(data)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    fingerprint = architecture_fingerprint(denoiser)
    start, checkpoint = resume_point(out, config, fingerprint, resume)
    resolution = config.resolution or family.native_resolution
    pipe.to(accelerator.device)
    with accelerator.main_process_first():  # one process builds the cache, the others then read it
        dataset = prepare_latents(  # before the surgery: the teacher samples
            pipe,
            data,
            out / "latents",
            resolution,
            seed=config.seed,
            num_inference_steps=config.teacher_steps,
            guidance_scale=config.teacher_guidance,
        )
    channels = denoiser.config.in_channels
    if dataset.latent_shape is not None and dataset.latent_shape[0] != channels:
        raise ValueError(
            f"The latents hold {dataset.latent_shape[0]} channels, the denoiser takes {channels}: "
            "they were made with another VAE."
        )
    teacher = teacher_sharing_weights(denoiser)
    flags = {param: param.requires_grad for param in denoiser.parameters()}
    was_checkpointing = denoiser.is_gradient_checkpointing
    surgery = apply(pipe, ConvFusion(kernel_size=config.kernel_size, gate=config.gate, seed=config.seed))
    try:
        for param in flags:
            param.requires_grad_(False)
        if config.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        trainer = Trainer(pipe, teacher, denoiser, surgery, config, accelerator, fingerprint, out)
        if checkpoint is not None:
            trainer.load(checkpoint)
        history = trainer.run(dataset, start, resolution)
        if accelerator.is_main_process:
            ConvFusion(blocks=trainer.blocks, fingerprint=fingerprint).save(out)
        accelerator.wait_for_everyone()
    finally:
        surgery.remove()
        if config.gradient_checkpointing and not was_checkpointing:
            denoiser.disable_gradient_checkpointing()
        for param, flag in flags.items():
            param.requires_grad_(flag)
    return DistillResult(ConvFusion.from_pretrained(out), history, out)
