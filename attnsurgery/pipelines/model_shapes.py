"""Pipelines of the published architectures with random weights, built from configs alone (no download).

Speed and memory depend on a model's shapes, not on its weights, so a benchmark can run on a machine that
has never downloaded a checkpoint. The configs below are the published ones (widths, depths, heads), written
out as dicts; a local diffusers config folder works the same way. Text encoders are not built (they run once
per prompt, the same with every plugin, and would need tokenizer files): ``prompt_inputs`` gives the pipeline
random prompt embeddings of the widths and lengths the real encoders produce.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..families import detect_family
from ..surgery import resolve_target
from .loading import meta_module, parse_dtype, read_denoiser_spec, read_json

__all__ = [
    "ModelShape",
    "SHAPES",
    "shape_of",
    "random_pipeline",
    "random_weights_",
    "prompt_inputs",
    "has_text_encoder",
]


@dataclass(frozen=True)
class ModelShape:
    """What a pipeline of random weights is built from: class names and configs of its parts."""

    pipeline: str
    denoiser: str
    denoiser_config: dict[str, Any]
    vae_config: dict[str, Any]
    scheduler: str
    scheduler_config: dict[str, Any]


_VAE = {  # the SD-family AutoencoderKL (SD1.x, SD2.x, SDXL; 16 latent channels for SD3 and FLUX)
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 512,
}
_VAE_16 = {**_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False, "sample_size": 1024}
_SD_BETAS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}
_SD_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "norm_num_groups": 32,
}
_SD3 = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
}
_FLUX = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
_FLUX_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def _sd3(**changes: Any) -> ModelShape:
    vae = {**_VAE_16, "scaling_factor": 1.5305, "shift_factor": 0.0609}
    return ModelShape(
        "StableDiffusion3Pipeline",
        "SD3Transformer2DModel",
        {**_SD3, **changes},
        vae,
        "FlowMatchEulerDiscreteScheduler",
        {"num_train_timesteps": 1000, "shift": 3.0},
    )


def _flux(**changes: Any) -> ModelShape:
    vae = {**_VAE_16, "scaling_factor": 0.3611, "shift_factor": 0.1159}
    scheduler = {**_FLUX_SCHEDULER, **changes.pop("scheduler", {})}
    return ModelShape(
        "FluxPipeline",
        "FluxTransformer2DModel",
        {**_FLUX, **changes},
        vae,
        "FlowMatchEulerDiscreteScheduler",
        scheduler,
    )


#: The published architectures by name (the diffusers configs of the base checkpoints).
SHAPES: dict[str, ModelShape] = {
    "sd15": ModelShape(
        "StableDiffusionPipeline",
        "UNet2DConditionModel",
        _SD_UNET,
        {**_VAE, "scaling_factor": 0.18215},
        "PNDMScheduler",
        {**_SD_BETAS, "skip_prk_steps": True, "set_alpha_to_one": False},
    ),
    "sd21": ModelShape(
        "StableDiffusionPipeline",
        "UNet2DConditionModel",
        {
            **_SD_UNET,
            "sample_size": 96,
            "attention_head_dim": [5, 10, 20, 20],
            "cross_attention_dim": 1024,
            "use_linear_projection": True,
            "upcast_attention": True,
        },
        {**_VAE, "sample_size": 768, "scaling_factor": 0.18215},
        "DDIMScheduler",
        {**_SD_BETAS, "prediction_type": "v_prediction", "clip_sample": False, "set_alpha_to_one": False},
    ),
    "sdxl": ModelShape(
        "StableDiffusionXLPipeline",
        "UNet2DConditionModel",
        {
            **_SD_UNET,
            "sample_size": 128,
            "block_out_channels": [320, 640, 1280],
            "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048,
            "transformer_layers_per_block": [1, 2, 10],
            "use_linear_projection": True,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "EulerDiscreteScheduler",
        {**_SD_BETAS, "timestep_spacing": "leading"},
    ),
    "sd3-medium": _sd3(),
    "sd35-medium": _sd3(qk_norm="rms_norm", dual_attention_layers=list(range(13)), pos_embed_max_size=384),
    "sd35-large": _sd3(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm"),
    "flux-dev": _flux(),
    "flux-schnell": _flux(guidance_embeds=False, scheduler={"shift": 1.0, "use_dynamic_shifting": False}),
}

#: The named shape whose pipeline, VAE and scheduler stand in for the parts a config folder lacks.
FAMILY_SHAPES = {
    "sd15": "sd15",
    "sd2": "sd21",
    "sdxl": "sdxl",
    "sd3": "sd3-medium",
    "sd35": "sd35-medium",
    "flux": "flux-dev",
}


def _optional_json(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None


def _folder_shape(folder: Path) -> ModelShape:
    """A config folder's denoiser, with its VAE and scheduler configs where it has them."""
    spec = read_denoiser_spec(folder)
    family = detect_family(meta_module(spec.class_name, spec.config), spec.vae_scale_factor)
    if family.name not in FAMILY_SHAPES:
        raise NotImplementedError(
            f"{folder}: random-weight pipelines are built for the families {', '.join(FAMILY_SHAPES)}, not "
            f"{family.name} (inpainting models and the newer DiTs, whose text encoders are LLMs, have no shape "
            "here yet); benchmark it from a folder with its weights instead"
        )
    base = SHAPES[FAMILY_SHAPES[family.name]]
    root = folder if (folder / "model_index.json").is_file() else folder.parent
    vae = _optional_json(root / "vae" / "config.json") or base.vae_config
    scheduler = _optional_json(root / "scheduler" / "scheduler_config.json")
    scheduler_class = scheduler.get("_class_name", base.scheduler) if scheduler else base.scheduler
    return ModelShape(
        base.pipeline, spec.class_name, spec.config, vae, scheduler_class, scheduler or base.scheduler_config
    )


def shape_of(pipe: Any) -> ModelShape:
    """The shape of a built pipeline, to build it again with random weights and no text encoders (the GPU
    suite's CPU smoke test runs the tiny test pipelines through the same path as the full-size shapes)."""
    _, denoiser = resolve_target(pipe)
    return ModelShape(
        type(pipe).__name__,
        type(denoiser).__name__,
        dict(denoiser.config),
        dict(pipe.vae.config),
        type(pipe.scheduler).__name__,
        dict(pipe.scheduler.config),
    )


def random_weights_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill a module's parameters in place: N(0, 0.02) matrices and kernels, unit norm scales, zero biases
    and buffers. Cost does not depend on the values, and these keep activations finite through deep models."""
    generator = None
    with torch.no_grad():
        for name, param in module.named_parameters():
            if generator is None:
                generator = torch.Generator(param.device).manual_seed(seed)
            if param.ndim >= 2:
                param.normal_(0.0, 0.02, generator=generator)
            else:
                param.fill_(0.0 if name.endswith("bias") else 1.0)
        for buffer in module.buffers():
            buffer.zero_()
    return module.eval().requires_grad_(False)


def _random_module(
    class_name: str, config: dict[str, Any], dtype: torch.dtype | None, device: str | torch.device, seed: int
) -> torch.nn.Module:
    """Built on the meta device and cast there, so the weights are allocated once, in their final dtype."""
    module = meta_module(class_name, config)
    if dtype is not None:  # torch's own to(): diffusers' warns about fp32-kept modules even when there are none
        module = torch.nn.Module.to(module, dtype)
    return random_weights_(module.to_empty(device=device), seed)


def _assemble(class_name: str, components: dict[str, Any]) -> Any:
    """The pipeline with only the given components; the rest (text encoders, tokenizers) are None."""
    import diffusers

    cls = getattr(diffusers, class_name)
    parameters = inspect.signature(cls.__init__).parameters
    kwargs = {name: None for name, p in parameters.items() if name != "self" and p.default is inspect.Parameter.empty}
    if "requires_safety_checker" in parameters:
        kwargs["requires_safety_checker"] = False
    return cls(**{**kwargs, **components})


def random_pipeline(
    model: str | os.PathLike[str] | ModelShape,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Any:
    """A text-to-image pipeline of random weights: denoiser, VAE and scheduler, no text encoders.

    Args:
        model: a name in ``SHAPES`` (``"sd15"``, ``"sdxl"``, ``"sd35-medium"``, ``"flux-dev"``, ...) or a
            local diffusers folder (pipeline or bare ``unet/``/``transformer/``) whose configs are used;
            parts the folder lacks come from its family's named shape; or a ``ModelShape``.
        dtype: ``"bf16"``, ``torch.float16``, ... (default float32).
        device: where the weights are allocated.
        seed: seed of the random weights.

    Example:
        >>> pipe = random_pipeline("sdxl", dtype="bf16", device="cuda")  # doctest: +SKIP
        >>> image = pipe(**prompt_inputs(pipe), height=2048, width=2048).images[0]  # doctest: +SKIP
    """
    if isinstance(model, ModelShape):
        shape = model
    elif str(model) in SHAPES:
        shape = SHAPES[str(model)]
    elif Path(model).expanduser().is_dir():
        shape = _folder_shape(Path(model).expanduser())
    else:
        raise ValueError(
            f"unknown model shape {str(model)!r}; use one of {', '.join(SHAPES)} or a local diffusers config folder"
        )
    import diffusers

    torch_dtype = parse_dtype(dtype)
    denoiser = _random_module(shape.denoiser, shape.denoiser_config, torch_dtype, device, seed)
    vae = _random_module("AutoencoderKL", shape.vae_config, torch_dtype, device, seed + 1)
    scheduler = getattr(diffusers, shape.scheduler).from_config(shape.scheduler_config)
    role = "unet" if shape.denoiser == "UNet2DConditionModel" else "transformer"
    return _assemble(shape.pipeline, {role: denoiser, "vae": vae, "scheduler": scheduler})


def has_text_encoder(pipe: Any) -> bool:
    """Whether the pipeline can encode a prompt itself."""
    return any(value is not None for name, value in pipe.components.items() if name.startswith("text_encoder"))


def prompt_inputs(pipe: Any, prompt: str = "a castle at dusk, detailed", seed: int = 0) -> dict[str, Any]:
    """Pipeline-call inputs for one prompt: the prompt itself, or for a pipeline without text encoders
    random embeddings of the widths and token count its encoders would produce (and negatives for CFG)."""
    if has_text_encoder(pipe):
        return {"prompt": prompt}
    _, denoiser = resolve_target(pipe)
    config, family = denoiser.config, detect_family(denoiser, getattr(pipe, "vae_scale_factor", None))
    generator = torch.Generator().manual_seed(seed)

    def embedding(*shape: int) -> torch.Tensor:
        return torch.randn(1, *shape, generator=generator).to(denoiser.device, denoiser.dtype)

    if family.kind == "unet":
        width, pooled = config.cross_attention_dim, None
        if config.get("addition_embed_type") == "text_time":
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    else:
        width, pooled = config.joint_attention_dim, config.pooled_projection_dim
    inputs = {"prompt_embeds": embedding(family.text_tokens, width)}
    if family.name != "flux":  # FLUX runs no classifier-free guidance (its guidance is an embedding)
        inputs["negative_prompt_embeds"] = embedding(family.text_tokens, width)
    if pooled is not None:
        inputs["pooled_prompt_embeds"] = embedding(pooled)
        if family.name != "flux":
            inputs["negative_pooled_prompt_embeds"] = embedding(pooled)
    return inputs
