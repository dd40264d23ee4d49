"""Running the tiny pipelines the same way in every test."""

from __future__ import annotations

import torch

DIT_KWARGS = {"max_sequence_length": 16}


def run_pipe(
    pipe, prompt: str = "a red circle", steps: int = 2, size: int = 64, seed: int = 0, output_type="np", **kwargs
):
    """Run a pipeline deterministically and return its output as a float tensor (numpy output type), or the
    latents (``output_type="latent"``: no VAE decode, which half precision makes slow on a CPU)."""
    if type(pipe).__name__.startswith(("StableDiffusion3", "Flux", "QwenImage", "ZImage", "Chroma")):
        kwargs = {**DIT_KWARGS, **kwargs}
    generator = torch.Generator("cpu").manual_seed(seed)
    height, width = (size, size) if isinstance(size, int) else size
    out = pipe(  # prompt by keyword: Flux2Pipeline's first positional argument is `image`
        prompt=prompt,
        num_inference_steps=steps,
        height=height,
        width=width,
        generator=generator,
        output_type=output_type,
        **kwargs,
    )
    return torch.from_numpy(out.images) if output_type == "np" else out.images.float()
