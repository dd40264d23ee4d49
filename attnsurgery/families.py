"""Model families, recognised from a denoiser's *config*, never from its name or hub id.

Presets (which layers a plugin touches, native size, joint token order) hang off the family, so a
fine-tune, a merge or a renamed local folder gets the same treatment as the base model it derives from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch

__all__ = ["Family", "detect_family", "FAMILY_NAMES"]

FAMILY_NAMES = ("sd15", "sd2", "sdxl", "sdxl-inpaint", "sd3", "sd35", "flux", "flux2", "qwenimage", "zimage", "chroma")

#: What ``detect_family`` recognises, for error messages.
SUPPORTED_DENOISERS = (
    "UNet2DConditionModel (SD1.x, SD2.x, SDXL), SD3Transformer2DModel (SD3, SD3.5), FluxTransformer2DModel, "
    "Flux2Transformer2DModel, QwenImageTransformer2DModel, ZImageTransformer2DModel and ChromaTransformer2DModel"
)

JointOrder = Literal["image_text", "text_image"]
#: What the denoiser receives as its timestep argument, given the scheduler's t on the 0-1000 scale.
TimestepInput = Literal["t", "t/1000", "1-t/1000"]
#: How the pipelines of a family lay out classifier-free guidance over denoiser calls:
#: one batch [uncond, cond] (SD, SDXL, SD3), one batch [cond, uncond] (Z-Image), or a separate
#: unconditional call after the conditional one at the same step (FLUX true CFG, FLUX.2 Klein, Qwen-Image, Chroma).
CfgLayout = Literal["uncond_cond", "cond_uncond", "separate"]
#: The DiT block lists, in the order the denoiser runs them (block indices count along this order).
_DIT_BLOCKS = ("transformer_blocks", "single_transformer_blocks")


@dataclass(frozen=True)
class Family:
    """What attnsurgery needs to know about a denoiser's architecture.

    Attributes:
        name: one of ``FAMILY_NAMES``.
        kind: ``"unet"`` (attention inside a convolutional U-Net) or ``"mmdit"`` (a DiT whose image and text
            tokens attend jointly: two-stream blocks, one-stream blocks, or both).
        native_resolution: training resolution in pixels (side of a square image).
        vae_scale_factor: pixels per latent cell.
        patch_size: latent cells per token side (1 for U-Nets).
        joint_order: token order of joint attention (SD3 and Z-Image image-then-text, the FLUX-likes and
            Qwen-Image text-then-image); each layer's ``text_placement`` in the inventory follows from it.
        inpaint: the denoiser takes masked-image channels (``in_channels == 9``).
        text_tokens: typical number of text tokens one cross/joint attention sees (for FLOP estimates).
        timestep_input: what the pipelines pass as the denoiser's timestep (see :meth:`scheduler_timestep`).
        cfg_layout: how the family's pipelines run classifier-free guidance (see ``CfgLayout``).
        blocks: the DiT's block lists in the order its forward runs them; empty on U-Nets.
    """

    name: str
    kind: Literal["unet", "mmdit"]
    native_resolution: int
    vae_scale_factor: int
    patch_size: int = 1
    joint_order: JointOrder | None = None
    inpaint: bool = False
    text_tokens: int = 77
    timestep_input: TimestepInput = "t"
    cfg_layout: CfgLayout = "uncond_cond"
    blocks: tuple[str, ...] = ()

    def scheduler_timestep(self, received: float) -> float:
        """The scheduler's timestep (0-1000 scale, 1000 = pure noise) for the value the denoiser received.

        Example:
            >>> Family("zimage", "mmdit", 1024, 8, timestep_input="1-t/1000").scheduler_timestep(0.25)
            750.0
        """
        if self.timestep_input == "t/1000":
            return received * 1000.0
        if self.timestep_input == "1-t/1000":
            return (1.0 - received) * 1000.0
        return received

    @property
    def native_latent(self) -> int:
        """Side of the native latent grid, in latent cells."""
        return self.native_resolution // self.vae_scale_factor


def _config_of(denoiser: torch.nn.Module) -> dict[str, Any]:
    config = getattr(denoiser, "config", None)
    if config is None:
        raise NotImplementedError(
            f"{type(denoiser).__name__} has no diffusers `config`; attnsurgery supports {SUPPORTED_DENOISERS}."
        )
    if not isinstance(config, Mapping):  # a transformers model (text encoder) has a config object, not a dict
        raise NotImplementedError(
            f"{type(denoiser).__name__} is not a diffusers denoiser (its config is a {type(config).__name__}); pass "
            f"the pipeline or its denoiser (pipe.unet or pipe.transformer). attnsurgery supports {SUPPORTED_DENOISERS}."
        )
    return dict(config)


def detect_family(denoiser: torch.nn.Module, vae_scale_factor: int | None = None) -> Family:
    """Recognise the family of a diffusers denoiser from its class and config.

    Args:
        denoiser: one of the classes in ``SUPPORTED_DENOISERS``.
        vae_scale_factor: pixels per latent cell, when known from the pipeline's VAE (default 8).

    Raises:
        NotImplementedError: for an architecture attnsurgery does not support, naming what was found.

    Example:
        >>> detect_family(pipe.unet, pipe.vae_scale_factor).name
        'sdxl'
    """
    import diffusers

    config = _config_of(denoiser)
    factor = int(vae_scale_factor or 8)
    if isinstance(denoiser, diffusers.UNet2DConditionModel):
        return _unet_family(config, factor)
    if isinstance(denoiser, diffusers.SD3Transformer2DModel):
        dual = tuple(config.get("dual_attention_layers") or ())
        name = "sd35" if (config.get("qk_norm") or dual) else "sd3"
        side = int(config.get("sample_size") or 128) * factor
        patch = int(config.get("patch_size", 2))
        return Family(name, "mmdit", side, factor, patch, "image_text", text_tokens=77 + 256, blocks=_DIT_BLOCKS)
    for class_name, make in _DIT_FAMILIES.items():
        if isinstance(denoiser, getattr(diffusers, class_name)):
            return make(config, factor)
    found = ", ".join(f"{k}={v!r}" for k, v in list(config.items())[:8] if not k.startswith("_"))
    raise NotImplementedError(
        f"unsupported denoiser {type(denoiser).__name__} ({found}); attnsurgery supports {SUPPORTED_DENOISERS}."
    )


def _side(config: dict[str, Any], native: int, factor: int) -> int:
    """Native side in pixels: these DiT configs carry no sample size, so the published training size is used,
    unless the config records its own (the reference DiT does, in latent cells as SD3's config does)."""
    return int(config.get("sample_size") or native // factor) * factor


def _flux_like(name: str, config: dict[str, Any], factor: int) -> Family:
    """FLUX.1 (trained at 1024 px), FLUX.2 and Chroma (their pipelines' default 128 latent cells x 8 = 1024 px):
    2x2 latent cells packed into a token, text first (T5 or Mistral, padded to 512)."""
    side = _side(config, 1024, factor)
    return Family(name, "mmdit", side, factor, 2, "text_image", text_tokens=512, **_FLOW_SEPARATE)


def _qwenimage(config: dict[str, Any], factor: int) -> Family:
    """Qwen-Image: the model card's 1:1 size is 1328 x 1328 px (its aspect-ratio table; diffusers'
    QwenImagePipeline defaults to 128 x 8 = 1024 px). Text first; prompts are not padded, so the text count
    is a typical prompt's (the pipeline caps it at 512)."""
    side = _side(config, 1328, factor)
    patch = int(config.get("patch_size", 2))
    return Family("qwenimage", "mmdit", side, factor, patch, "text_image", text_tokens=128, **_FLOW_SEPARATE)


def _zimage(config: dict[str, Any], factor: int) -> Family:
    """Z-Image: ZImagePipeline's default 1024 px; image tokens first, each stream padded to a multiple of 32.
    The pipeline passes (1000 - t) / 1000 and batches CFG as [cond, uncond]. Blocks run image-only
    ``noise_refiner``, then text-only ``context_refiner``, then the joint ``layers``."""
    side = _side(config, 1024, factor)
    patch = int((config.get("all_patch_size") or (2,))[0])
    return Family(
        "zimage",
        "mmdit",
        side,
        factor,
        patch,
        "image_text",
        text_tokens=128,
        timestep_input="1-t/1000",
        cfg_layout="cond_uncond",
        blocks=("noise_refiner", "context_refiner", "layers"),
    )


# The FLUX-likes and Qwen-Image: pipelines pass t / 1000 and run CFG as a separate unconditional call.
_FLOW_SEPARATE: dict[str, Any] = dict(timestep_input="t/1000", cfg_layout="separate", blocks=_DIT_BLOCKS)

_DIT_FAMILIES: dict[str, Callable[[dict[str, Any], int], Family]] = {
    "FluxTransformer2DModel": partial(_flux_like, "flux"),
    "Flux2Transformer2DModel": partial(_flux_like, "flux2"),
    "ChromaTransformer2DModel": partial(_flux_like, "chroma"),
    "QwenImageTransformer2DModel": _qwenimage,
    "ZImageTransformer2DModel": _zimage,
}


def _unet_family(config: dict[str, Any], factor: int) -> Family:
    """SDXL has added text-time conditioning; SD2 uses linear projections in its transformers."""
    inpaint = int(config.get("in_channels", 4)) == 9
    side = int(config.get("sample_size") or 64) * factor
    if config.get("addition_embed_type") == "text_time":
        return Family("sdxl-inpaint" if inpaint else "sdxl", "unet", side, factor, inpaint=inpaint)
    name = "sd2" if config.get("use_linear_projection") else "sd15"
    return Family(name, "unet", side, factor, inpaint=inpaint)
