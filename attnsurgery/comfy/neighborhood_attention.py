"""Neighborhood attention on ComfyUI's FLUX and SD3 models, as a node (the DiT form of HiDiffusion's MSW-MSA).

Above the native size each image query attends its native-sized window of image tokens plus every text token;
text queries attend everything. The chosen blocks get DiT block patches whose attention override runs the plugin's
own processor on each call (:class:`~attnsurgery.processors.neighborhood.NeighborhoodProcessor`: its schedule,
:func:`attnsurgery.ops.neighborhood.neighborhood_attention` with its backends, ``auto`` by default) in place of
the dense attention; a keyed model wrapper hands the blocks the latent's token grid. The settings are
validated by the :class:`~attnsurgery.plugins.neighborhood.NeighborhoodAttention` plugin config.
"""

from __future__ import annotations

from typing import Any

from ..plugins.neighborhood import BACKEND_CHOICES, NeighborhoodAttention
from ..processors.neighborhood import NeighborhoodProcessor, NeighborhoodSchedule
from .dit import dit_family, dit_sites, patch_joint_processors
from .node import ModelPatchNode
from .patching import select_heads

__all__ = ["AttnSurgeryNeighborhoodAttention"]

TECHNIQUE = "Neighborhood Attention"


def _size(default: int, minimum: int, tooltip: str) -> tuple[str, dict]:
    return ("INT", {"default": default, "min": minimum, "max": 4096, "tooltip": tooltip})


class AttnSurgeryNeighborhoodAttention(ModelPatchNode):
    """Native-sized local windows over the image tokens of FLUX and SD3 above their native size."""

    DESCRIPTION = (
        "Neighborhood attention for DiTs (FLUX, SD3/SD3.5; ComfyUI 0.20.1 or newer): above the native size "
        "(1024 px) each image token attends its native-sized neighbourhood of image tokens plus every text "
        "token, so the model sees what it was trained on and attention costs N x window instead of N^2. "
        "Idle at or below the native size unless force is on. U-Nets: use the HiDiffusion nodes."
    )

    @classmethod
    def inputs(cls) -> dict[str, Any]:
        return {
            "layers": (
                "STRING",
                {
                    "default": "all",
                    "tooltip": "Layers in diffusers names, as in the Python API: a group ('all', 'joint', "
                    "'single'), an exact or enclosing path such as 'transformer_blocks.3' or "
                    "'single_transformer_blocks.10.attn', or a glob ('*' within one path segment, '**' "
                    "across); several separated by spaces, ';' or ','.",
                },
            ),
            "window": _size(0, 0, "Keys per side of the window in tokens; 0 = the native grid (64 on FLUX/SD3)."),
            "stride": _size(1, 1, "Queries per side sharing one window (1: every query centred; = window: blocks)."),
            "dilation": _size(1, 1, "Attend every dilation-th token of the grid."),
            "start_percent": (
                "FLOAT",
                {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Local attention from here."},
            ),
            "end_percent": (
                "FLOAT",
                {
                    "default": 1.0,
                    "min": 0.0,
                    "max": 1.0,
                    "step": 0.01,
                    "tooltip": "Local attention until here (global before start and after end: the layout "
                    "forms in the first steps, so a start of 0.1-0.3 helps at large sizes).",
                },
            ),
            "backend": (
                list(BACKEND_CHOICES),
                {
                    "default": "auto",
                    "tooltip": "auto (natten on CUDA when installed, else FlexAttention, else SDPA tiles), "
                    "or one backend by name.",
                },
            ),
            "force": ("BOOLEAN", {"default": False, "tooltip": "Also act at or below the native size."}),
        }

    def patch(
        self,
        model: Any,
        layers: str,
        window: int,
        stride: int,
        dilation: int,
        start_percent: float,
        end_percent: float,
        backend: str,
        force: bool,
    ) -> tuple[Any]:
        """Clone ``model`` and register the block patches and the token-grid wrapper."""
        config = NeighborhoodAttention(
            window=window or "native",
            stride=stride,
            dilation=dilation,
            start=start_percent,
            stop=end_percent,
            backend=backend,
            force=force,
        )
        if hasattr(model.model.diffusion_model, "input_blocks"):
            raise ValueError(
                "Neighborhood Attention is for DiTs (FLUX, SD3); this model is a U-Net. Use the HiDiffusion "
                "Window Attention or RAU-Net nodes there (MSW-MSA is the U-Net form of local attention)."
            )
        sites = dit_sites(model)  # refuses a ComfyUI without the patch points, and other DiTs
        family = dit_family(model)
        selected = list(select_heads(sites, layers, family))
        side = family.native_latent // family.patch_size
        window_pair = (side, side) if config.window == "native" else config.window
        config._check_stride(window_pair)

        def make(inner, site, clock, seed) -> NeighborhoodProcessor:
            schedule = NeighborhoodSchedule(
                clock,
                (side, side),
                window_pair,
                config.stride,
                config.dilation,
                config.start,
                config.stop,
                config.force,
                False,  # proportional: it scales the layers left global too, which get no patch here
                config.backend,
            )
            return NeighborhoodProcessor(inner, path=site.path, text_first=True, schedule=schedule)

        return (patch_joint_processors(model, selected, make, None, TECHNIQUE),)
