"""HiDiffusion's window attention (MSW-MSA) on the top U-Net self-attention layers, as a ComfyUI node.

The attn1 patch shifts the layer's tokens and cuts them into 2x2 windows stacked along the batch
(:mod:`attnsurgery.ops.windows`), so ComfyUI's own attention attends within each window; the attn1 output
patch merges the windows back. The window layout travels in that call's ``extra_options``. Like the
package, it acts only above the model's native size unless forced.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..ops.windows import WindowGrid, draw_shift_index, merge_windows, partition_windows, shift_for_index
from ..plugins.hidiffusion import HiDiffusion
from .node import LAYERS_INPUT, ModelPatchNode
from .patching import (
    DIT_LIMITATION,
    call_generator,
    claim_token_layers,
    model_family,
    select_layers,
    token_grid,
    unet_attention_sites,
)

__all__ = ["AttnSurgeryWindowAttention", "window_patches"]

logger = logging.getLogger(__name__)

GRID_KEY = "attnsurgery_window_grid"
SHIFTS = ["random", "0", "1", "2", "3"]


def window_patches(keys: set[tuple[str, int, int]], config: HiDiffusion, native: int):
    """(attn1_patch, attn1_output_patch) running the chosen layers' self-attention in shifted windows."""

    def partition(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict):
        block, index = extra_options.get("block"), extra_options.get("block_index", 0)
        if block is None or (block[0], block[1], index) not in keys:
            return q, k, v
        shape = extra_options["original_shape"]
        if not config.force and max(shape[-2:]) <= native:
            return q, k, v  # nothing to fix at or below the native size
        if k is not q or v is not q:
            raise NotImplementedError("window attention needs plain self-attention (k and v are q's tokens)")
        height, width = token_grid(shape, q.shape[1])
        grid = WindowGrid(height, width, rows=min(2, height), cols=min(2, width))
        if grid.needs_padding:  # padded keys would need a mask, which ComfyUI's attn1 call cannot take
            logger.warning(
                "window attention skips a %dx%d token grid: an odd side does not split into equal "
                "windows (use image sides divisible by 16 for SD1.x, 32 for SDXL)",
                height,
                width,
            )
            return q, k, v
        shift = (
            config.shift
            if isinstance(config.shift, int)
            else draw_shift_index(call_generator(config.seed, extra_options))
        )
        grid = WindowGrid(height, width, grid.rows, grid.cols, shift_for_index(grid.window, shift))
        extra_options[GRID_KEY] = grid
        windows = partition_windows(q, grid)
        return windows, windows, windows

    def merge(out: torch.Tensor, extra_options: dict) -> torch.Tensor:
        grid = extra_options.pop(GRID_KEY, None)
        return out if grid is None else merge_windows(out, grid)

    return partition, merge


class AttnSurgeryWindowAttention(ModelPatchNode):
    """HiDiffusion's MSW-MSA on chosen U-Net self-attention layers."""

    DESCRIPTION = (
        "HiDiffusion window attention (MSW-MSA): the top blocks' self-attention runs in 2x2 shifted windows, "
        "about 4x fewer attention FLOPs there, above the native size. RAU-Net is not part of this node. "
        + DIT_LIMITATION
    )

    @classmethod
    def inputs(cls) -> dict[str, Any]:
        return {
            "layers": LAYERS_INPUT,
            "shift": (
                SHIFTS,
                {
                    "default": "random",
                    "tooltip": "random: one of the four diagonal shifts per layer and step "
                    "(seeded); 0-3: always that shift.",
                },
            ),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Seed of the random shifts."}),
            "force": ("BOOLEAN", {"default": False, "tooltip": "Also act at or below the model's native size."}),
        }

    def patch(self, model: Any, layers: str, shift: str, seed: int, force: bool) -> tuple[Any]:
        """Clone ``model`` and register the window partition and merge patches."""
        config = HiDiffusion(
            raunet=False, window_attn=True, shift=shift if shift == "random" else int(shift), seed=seed, force=force
        )
        keys = select_layers(unet_attention_sites(model), layers, model_family(model))
        patched = model.clone()
        claim_token_layers(patched, keys, "WindowAttention")
        partition, merge = window_patches(keys, config, model_family(model).native_latent)
        patched.set_model_attn1_patch(partition)
        patched.set_model_attn1_output_patch(merge)
        return (patched,)
