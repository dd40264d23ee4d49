"""The `hidiffusion` 0.1.10 package as a test peer (import shim, forced shifts, clean removal), and a runner.

The package draws each MSW-MSA shift with `torch.rand(1)` from the global RNG. Replacing the `torch`
name inside its module with a proxy whose `rand` returns chosen values forces a known shift sequence
(value (k + 0.5) / 4 selects shift index k) without touching the global RNG of anything else.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator, Sequence

import torch

# Instance attributes the package sets on modules (and the pipeline) and never deletes.
LEFT_BEHIND = (
    "info",
    "model",
    "switching_threshold_ratio",
    "timestep",
    "max_timestep",
    "T1_ratio",
    "T1",
    "T1_start",
    "T1_end",
    "aggressive_raunet",
    "ori_stride",
    "ori_padding",
    "ori_dilation",
)
PACKAGE_NAMES = {"sd15": "runwayml/stable-diffusion-v1-5", "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


def run_latents(pipe, size: int | tuple[int, int] = 256, steps: int = 2, **kwargs) -> torch.Tensor:
    """Run a pipeline from a fixed seed and return its final latents (no VAE decode: faster)."""
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(
        "a red circle",
        num_inference_steps=steps,
        height=height,
        width=width,
        generator=generator,
        output_type="latent",
        **kwargs,
    ).images


def import_package():
    """Import `hidiffusion`, mapping the module path it expects onto the one diffusers >= 0.41 has."""
    moved = importlib.import_module("diffusers.models.controlnets.multicontrolnet")
    sys.modules.setdefault("diffusers.pipelines.controlnet.multicontrolnet", moved)
    return importlib.import_module("hidiffusion"), importlib.import_module("hidiffusion.hidiffusion")


class ForcedShifts:
    """Stands in for `torch` inside the package: `rand` replays shift indices, all else is torch."""

    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = list(indices)
        self.calls = 0

    def rand(self, *size, **kwargs) -> torch.Tensor:
        index = self.indices[self.calls]
        self.calls += 1
        return torch.tensor([(index + 0.5) / 4])

    def __getattr__(self, name: str):
        return getattr(torch, name)


@contextlib.contextmanager
def package_applied(
    pipe, family: str, *, raunet: bool, window_attn: bool, shifts: Sequence[int] = ()
) -> Iterator[ForcedShifts]:
    """The package applied to `pipe` with forced shifts; afterwards everything it leaves is undone."""
    package, module = import_package()
    forced = ForcedShifts(shifts)
    name_before = pipe.config.get("_name_or_path")
    upsamplers_before = pipe.unet.num_upsamplers
    pipe.register_to_config(_name_or_path=PACKAGE_NAMES[family])
    module.torch = forced
    try:
        package.apply_hidiffusion(pipe, apply_raunet=raunet, apply_window_attn=window_attn)
        yield forced
    finally:
        package.remove_hidiffusion(pipe)
        module.torch = torch
        pipe.unet.num_upsamplers = upsamplers_before  # the package never undoes its += 12
        pipe.register_to_config(_name_or_path=name_before)
        for attribute in LEFT_BEHIND:
            for sub in (pipe, *pipe.unet.modules()):
                sub.__dict__.pop(attribute, None)
