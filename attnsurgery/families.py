"""Model families, recognised from a denoiser's *config*, never from its name or hub id.

Presets (which layers a plugin touches, native size, joint token order) hang off the family, so a
fine-tune, a merge or a renamed local folder gets the same treatment as the base model it derives from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = ["Family", "detect_family", "FAMILY_NAMES"]

FAMILY_NAMES = ("sd15", "sd2", "sdxl", "sdxl-inpaint", "sd3", "sd35", "flux")

JointOrder = Literal["image_text", "text_image"]


@dataclass(frozen=True)
class Family:
    """What attnsurgery needs to know about a denoiser's architecture.

    Attributes:
        name: one of ``FAMILY_NAMES``.
        kind: ``"unet"`` (attention inside a convolutional U-Net) or ``"mmdit"`` (joint-attention DiT).
        native_resolution: training resolution in pixels (side of a square image).
        vae_scale_factor: pixels per latent cell.
        patch_size: latent cells per token side (1 for U-Nets).
        joint_order: token order of joint attention (SD3 image-then-text, FLUX text-then-image).
        inpaint: the denoiser takes masked-image channels (``in_channels == 9``).
        text_tokens: typical number of text tokens one cross/joint attention sees (for FLOP estimates).
    """

    name: str
    kind: Literal["unet", "mmdit"]
    native_resolution: int
    vae_scale_factor: int
    patch_size: int = 1
    joint_order: JointOrder | None = None
    inpaint: bool = False
    text_tokens: int = 77

    @property
    def native_latent(self) -> int:
        """Side of the native latent grid, in latent cells."""
        return self.native_resolution // self.vae_scale_factor


def _config_of(denoiser: torch.nn.Module) -> dict[str, Any]:
    config = getattr(denoiser, "config", None)
    if config is None:
        raise NotImplementedError(
            f"{type(denoiser).__name__} has no diffusers `config`; attnsurgery supports "
            "UNet2DConditionModel, SD3Transformer2DModel and FluxTransformer2DModel denoisers."
        )
    return dict(config)


def detect_family(denoiser: torch.nn.Module, vae_scale_factor: int | None = None) -> Family:
    """Recognise the family of a diffusers denoiser from its class and config.

    Args:
        denoiser: a UNet2DConditionModel, SD3Transformer2DModel or FluxTransformer2DModel.
        vae_scale_factor: pixels per latent cell, when known from the pipeline's VAE (default 8).

    Raises:
        NotImplementedError: for an architecture attnsurgery does not support, naming what was found.

    Example:
        >>> detect_family(pipe.unet, pipe.vae_scale_factor).name
        'sdxl'
    """
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    config = _config_of(denoiser)
    factor = int(vae_scale_factor or 8)
    if isinstance(denoiser, UNet2DConditionModel):
        return _unet_family(config, factor)
    if isinstance(denoiser, SD3Transformer2DModel):
        dual = tuple(config.get("dual_attention_layers") or ())
        name = "sd35" if (config.get("qk_norm") or dual) else "sd3"
        side = int(config.get("sample_size") or 128) * factor
        return Family(name, "mmdit", side, factor, int(config.get("patch_size", 2)), "image_text", text_tokens=77 + 256)
    if isinstance(denoiser, FluxTransformer2DModel):
        # FLUX configs carry no sample size; FLUX.1 is trained at 1024 px. One that records its own (the
        # reference DiT) says so with ``sample_size``, in latent cells as SD3's config does.
        side = int(config.get("sample_size") or 1024 // factor) * factor
        return Family("flux", "mmdit", side, factor, 2, "text_image", text_tokens=512)
    found = ", ".join(f"{k}={v!r}" for k, v in list(config.items())[:8] if not k.startswith("_"))
    raise NotImplementedError(
        f"unsupported denoiser {type(denoiser).__name__} ({found}); attnsurgery supports "
        "UNet2DConditionModel (SD1.x, SD2.x, SDXL), SD3Transformer2DModel (SD3, SD3.5) and "
        "FluxTransformer2DModel."
    )


def _unet_family(config: dict[str, Any], factor: int) -> Family:
    """SDXL has added text-time conditioning; SD2 uses linear projections in its transformers."""
    inpaint = int(config.get("in_channels", 4)) == 9
    side = int(config.get("sample_size") or 64) * factor
    if config.get("addition_embed_type") == "text_time":
        return Family("sdxl-inpaint" if inpaint else "sdxl", "unet", side, factor, inpaint=inpaint)
    name = "sd2" if config.get("use_linear_projection") else "sd15"
    return Family(name, "unet", side, factor, inpaint=inpaint)
