"""The plugin x diffusers-feature matrix (issue 17): one case per plugin and model kind, each at a size where
the plugin acts, so that a test can first show the plugin's effect is there."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import attnsurgery as surg
from attnsurgery.testing.tiny import tiny_sd15
from tests.support import dit_families

UNET_PX = 128  # latent 16: enough tokens that merging, agents and the top-level PAG act
FLUX_PX = 2 * dit_families.NATIVE_PX  # neighborhood attention is idle at native size


def sd15() -> Any:
    pipe = tiny_sd15()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux() -> Any:
    return dit_families.build("flux")


#: case -> (pipeline builder, plugin, run_pipe kwargs)
PLUGINS: dict[str, tuple[Callable[[], Any], Callable[[], surg.Plugin], dict]] = {
    "sd15-hidiffusion": (sd15, lambda: surg.HiDiffusion(force=True, t1=0.5, t2=0.5), dict(size=UNET_PX)),
    "sd15-token_merging": (sd15, surg.TokenMerging, dict(size=UNET_PX)),
    "sd15-agent": (sd15, surg.AgentAttention, dict(size=UNET_PX)),
    "sd15-pag": (sd15, lambda: surg.PerturbedAttention(layers="top"), dict(size=UNET_PX)),
    "flux-neighborhood": (flux, surg.NeighborhoodAttention, dict(size=FLUX_PX)),
    "flux-token_merging": (flux, surg.TokenMerging, dict(size=FLUX_PX)),
    "flux-agent": (flux, surg.AgentAttention, dict(size=FLUX_PX)),
    "flux-pag": (flux, surg.PerturbedAttention, dict(size=FLUX_PX, **dit_families.FAMILIES["flux"][1])),
}


def denoiser(pipe: Any) -> torch.nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 1e-3)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> bool:
    return bool((a - b).abs().max() < atol)
