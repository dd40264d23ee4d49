"""Tiny pipelines of the variants that guidance plugins support besides the base ones (ControlNet, Kontext,
Fill, depth-to-image), built from the tiny components, with the inputs each needs at 64 px."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from diffusers import (
    FluxControlNetImg2ImgPipeline,
    FluxControlNetInpaintPipeline,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxFillPipeline,
    FluxKontextInpaintPipeline,
    FluxKontextPipeline,
    FluxTransformer2DModel,
    SD3ControlNetModel,
    StableDiffusion3ControlNetInpaintingPipeline,
    StableDiffusion3ControlNetPipeline,
    StableDiffusionDepth2ImgPipeline,
)
from PIL import Image

from attnsurgery.testing.tiny import tiny_flux, tiny_sd3, tiny_sd15

SIZE = 64
_SHAPE = dict(height=SIZE, width=SIZE, max_sequence_length=16)  # where the pipeline takes them


def image(size: int = SIZE, seed: int = 0) -> Image.Image:
    """A random RGB picture (control, reference or init image)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def mask(size: int = SIZE) -> Image.Image:
    """Repaint the right half."""
    pixels = np.zeros((size, size), dtype=np.uint8)
    pixels[:, size // 2 :] = 255
    return Image.fromarray(pixels)


def _flux_parts() -> dict[str, Any]:
    """The tiny FLUX.1 components without the optional IP-Adapter image encoder (Fill takes none)."""
    parts = tiny_flux().components
    return {
        name: parts[name]
        for name in ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")
    }


def _flux_controlnet(pipeline_class: type) -> Any:
    """A one-block ControlNet taken from the tiny FLUX.1 transformer."""
    parts = _flux_parts()
    controlnet = FluxControlNetModel.from_transformer(
        parts["transformer"], num_layers=1, num_single_layers=0, attention_head_dim=16, num_attention_heads=2
    )
    return pipeline_class(**parts, controlnet=controlnet.eval())


def flux_kontext() -> FluxKontextPipeline:
    return FluxKontextPipeline(**_flux_parts())


def flux_kontext_inpaint() -> FluxKontextInpaintPipeline:
    return FluxKontextInpaintPipeline(**_flux_parts())


def flux_fill() -> FluxFillPipeline:
    """FLUX.1-Fill's input: 16 packed latent + 16 masked-image + 4 x 64 mask channels, guidance embedding."""
    parts = _flux_parts()
    torch.manual_seed(1)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16 + 16 + 4 * 64,
        out_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
        guidance_embeds=True,
    )
    return FluxFillPipeline(**{**parts, "transformer": transformer.eval().requires_grad_(False)})


def _sd3_controlnet(pipeline_class: type, extra_channels: int) -> Any:
    parts = tiny_sd3(num_layers=2).components
    controlnet = SD3ControlNetModel.from_transformer(
        parts["transformer"], num_layers=1, num_extra_conditioning_channels=extra_channels
    )
    return pipeline_class(**parts, controlnet=controlnet.eval())


def sd3_controlnet() -> StableDiffusion3ControlNetPipeline:
    return _sd3_controlnet(StableDiffusion3ControlNetPipeline, 0)


def sd3_controlnet_inpaint() -> StableDiffusion3ControlNetInpaintingPipeline:
    """Its ControlNet takes the mask as one extra conditioning channel."""
    return _sd3_controlnet(StableDiffusion3ControlNetInpaintingPipeline, 1)


def depth2img() -> StableDiffusionDepth2ImgPipeline:
    """SD's U-Net with one more input channel (the depth); tests pass ``depth_map``, so no estimator is needed."""
    sd15 = tiny_sd15(in_channels=5).components
    parts = {name: sd15[name] for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    return StableDiffusionDepth2ImgPipeline(**parts, depth_estimator=None, feature_extractor=None)


@dataclass(frozen=True)
class Variant:
    """A pipeline builder and its call arguments: always, without CFG, and with CFG (None: it has none)."""

    build: Callable[[], Any]
    inputs: Callable[[], dict[str, Any]]
    plain: dict[str, Any] = field(default_factory=dict)
    cfg: dict[str, Any] | None = None


_KONTEXT = dict(max_area=SIZE * SIZE, _auto_resize=False)
_TRUE_CFG = dict(true_cfg_scale=4.0, negative_prompt="blurry")
VARIANTS = {
    "flux-controlnet": Variant(
        partial(_flux_controlnet, FluxControlNetPipeline), lambda: dict(control_image=image()), {}, _TRUE_CFG
    ),
    "flux-controlnet-img2img": Variant(
        partial(_flux_controlnet, FluxControlNetImg2ImgPipeline),
        lambda: dict(image=image(seed=1), control_image=image(), strength=1.0),
    ),
    "flux-controlnet-inpaint": Variant(
        partial(_flux_controlnet, FluxControlNetInpaintPipeline),
        lambda: dict(image=image(seed=1), mask_image=mask(), control_image=image(), strength=1.0),
    ),
    "flux-kontext": Variant(flux_kontext, lambda: dict(image=image(), **_KONTEXT), {}, _TRUE_CFG),
    "flux-kontext-inpaint": Variant(
        flux_kontext_inpaint, lambda: dict(image=image(), mask_image=mask(), strength=1.0, **_KONTEXT), {}, _TRUE_CFG
    ),
    "flux-fill": Variant(flux_fill, lambda: dict(image=image(), mask_image=mask(), guidance_scale=30.0)),
    "sd3-controlnet": Variant(
        sd3_controlnet, lambda: dict(control_image=image()), dict(guidance_scale=1.0), dict(guidance_scale=4.0)
    ),
    "sd3-controlnet-inpaint": Variant(
        sd3_controlnet_inpaint,
        lambda: dict(control_image=image(), control_mask=mask()),
        dict(guidance_scale=1.0),
        dict(guidance_scale=4.0),
    ),
    "depth2img": Variant(
        depth2img,
        lambda: dict(image=image(), depth_map=torch.rand(1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))),
        dict(guidance_scale=1.0, strength=1.0),
        dict(guidance_scale=4.0, strength=1.0),
    ),
}


def build(name: str) -> Any:
    pipe = VARIANTS[name].build()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe: Any, name: str, cfg: bool, steps: int = 1, **kwargs: Any) -> torch.Tensor:
    """One deterministic run of variant ``name``, with or without CFG, as latents."""
    variant = VARIANTS[name]
    run = {**variant.inputs(), **(variant.cfg if cfg else variant.plain), **kwargs}
    parameters = inspect.signature(pipe.__call__).parameters
    run.update({key: value for key, value in _SHAPE.items() if key in parameters})
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt="a red cube", generator=generator, num_inference_steps=steps, output_type="latent", **run).images
