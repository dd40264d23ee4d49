"""Text-to-image generation with plugins applied for the duration of the call, one image per seed."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..plugins.base import plugin_from_dict
from ..surgery import patched
from .loading import default_guidance_scale
from .metadata import GenerationParams

__all__ = ["generate"]


def _call_kwargs(pipe: Any, params: GenerationParams) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "num_inference_steps": params.steps,
        "guidance_scale": params.cfg,
        "generator": torch.Generator("cpu").manual_seed(params.seed),
    }
    if params.height:
        kwargs["height"] = params.height
    if params.width:
        kwargs["width"] = params.width
    if params.negative_prompt:
        kwargs["negative_prompt"] = params.negative_prompt
    return kwargs


def generate(
    pipe: Any, params: GenerationParams, num_images: int = 1, progress: bool = True
) -> list[tuple[Image.Image, GenerationParams]]:
    """Generate ``num_images`` images with seeds ``params.seed, params.seed + 1, ...``.

    The plugins in ``params.plugins`` (``to_dict`` form) are applied around the whole run and removed
    afterwards, also on an error. Each image comes back with the exact parameters that reproduce it
    (an unset guidance scale becomes the model's own).

    Example:
        >>> from attnsurgery.pipelines.loading import load_pipeline
        >>> params = GenerationParams("a red circle", steps=20, seed=3)
        >>> [(image, used)] = generate(load_pipeline("reference"), params)
        >>> image.size, used.seed, used.cfg  # the unset cfg became the reference model's own
        ((64, 64), 3, 2.0)
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if params.cfg is None:
        params = dataclasses.replace(params, cfg=default_guidance_scale(params.model))
    plugins = [plugin_from_dict(dict(data)) for data in params.plugins]
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    results = []
    surgery = patched(pipe, *plugins) if plugins else contextlib.nullcontext()
    with surgery:
        for index in tqdm(range(num_images), desc="images", disable=not progress or num_images == 1):
            used = dataclasses.replace(params, seed=params.seed + index)
            image = pipe(used.prompt, **_call_kwargs(pipe, used)).images[0]
            results.append((image, used))
    return results
