"""HiDiffusion's RAU-Net (and optionally its window attention) on a ComfyUI U-Net, as a node.

RAU-Net acts through ComfyUI's block patches, with the library's maths (:mod:`attnsurgery.ops.raunet`) and
the plugin's sites, presets and timing (:class:`~attnsurgery.plugins.hidiffusion.HiDiffusion`):

- RAD: the input-block patch *after the skip* of the last pair before the chosen downsampler hands it every
  second row and column; its 3x3 stride-2 conv on ``x[..., ::2, ::2]`` is HiDiffusion's stride-4, dilation-2
  conv with the same weights, so no object patch is needed and weight patches (LoRA) keep working.
- RAU: ComfyUI's upsamplers already interpolate to the size of the skip they meet (``output_shape``), so the
  matching upsampler needs no patch.
- Block pool/unpool: the input-block patch pools the first pair of the chosen block before its skip is saved;
  the output-block patch of the mirrored block's third pair resizes the features back to that skip's size.
- ControlNet: a U-Net wrapper (:func:`~.patching.wrap_unet`) resizes the control residuals to the feature
  sizes RAU-Net produces in this call (ComfyUI adds them inside the U-Net and drops them with a warning when
  sizes differ).

The wrapper also decides the call's phase once and leaves it in that call's ``transformer_options``; the
block patches read it from there (or decide it themselves when a caller bypasses the wrapper).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..context import StepContext, locate_timestep
from ..families import Family
from ..ops.raunet import DownBlockShape, down_path_sizes, pool_features, resize_features
from ..plugins.hidiffusion import HiDiffusion, HiDiffusionLayout, layout_for
from ..processors.raunet import RauNetPhase
from .node import ModelPatchNode
from .patching import (
    DIT_LIMITATION,
    UnetCall,
    claim_token_layers,
    current_sigma,
    model_family,
    model_sampling,
    select_layers,
    unet_attention_sites,
    wrap_unet,
)
from .window_attention import SHIFTS, window_patches

__all__ = ["AttnSurgeryHiDiffusion", "RauNetBlocks", "SigmaClock", "raunet_blocks"]

PHASE_KEY = "attnsurgery_raunet_phase"
OWNER_KEY = "attnsurgery_raunet"
PRESET = -1.0
AGGRESSIVE = {"preset": None, "on": True, "off": False}
TIE = 1e-5  # a step whose sigma sits on a ratio's boundary counts as past it (percent < ratio, not <=)


@dataclass
class SigmaClock(StepContext):
    """A step context for a ComfyUI call: "the first r of the schedule" read from sigmas.

    With the run's sigmas (``sample_sigmas``, which newer ComfyUI passes in every call) it is the package's rule,
    step < floor(N * r), except that a ratio above 0 always covers the first step: short runs (1-4 steps of
    Turbo, LCM or Lightning models) would otherwise round RAU-Net away entirely (2 steps at r = 0.4: floor 0)
    exactly where the first step lays out the image, and the node would silently do nothing. Without them
    (ComfyUI of March 2024) the step's denoising percent below r: sigma above ``percent_to_sigma(r)``, which
    also always covers the first step.
    """

    sigma: float = 0.0
    percent_to_sigma: Callable[[float], float] | None = None

    def in_first(self, fraction: float) -> bool:
        if self.step_index is not None and self.num_steps is not None:
            return fraction > 0 and (self.step_index == 0 or super().in_first(fraction))
        if self.percent_to_sigma is None:
            return super().in_first(fraction)
        return self.sigma > float(self.percent_to_sigma(fraction)) * (1 + TIE)


@dataclass(frozen=True)
class RauNetBlocks:
    """RAU-Net's sites as ComfyUI numbers its blocks, and what the down path does to sizes.

    Args:
        family: The model's family (presets, native size).
        layout: The plugin's layout (diffusers block indices), for presets and window blocks.
        rad_input: Input block after whose skip the features are subsampled (feeds the RAD downsampler).
        pool_input: Input block (first pair of the pooled level) whose output is pooled.
        unpool_output: Output block (third pair of the mirrored level) before which features are resized back.
        down_shapes: Per level, pairs and downsampler (kernel, stride, padding), for ControlNet sizes.
    """

    family: Family
    layout: HiDiffusionLayout
    rad_input: int
    pool_input: int
    unpool_output: int
    down_shapes: tuple[DownBlockShape, ...]


def _downsampler_shape(block: torch.nn.Module) -> tuple[int, int, int, int]:
    op = getattr(block[0], "op", None)
    if not isinstance(op, (torch.nn.Conv2d, torch.nn.AvgPool2d)):
        raise NotImplementedError(f"{type(block[0]).__name__} is no downsampler RAU-Net knows; remove the node.")

    def first(value: Any) -> int:
        return int(value[0] if isinstance(value, tuple) else value)

    dilation = first(getattr(op, "dilation", 1))
    return first(op.kernel_size), first(op.stride), first(op.padding), dilation


def raunet_blocks(model: Any) -> RauNetBlocks:
    """Find RAU-Net's sites in a ComfyUI U-Net (SD1.x/2.x: RAD at the top level, pool below; SDXL: both at
    the first attention level).

    Raises:
        NotImplementedError: a DiT, or a U-Net whose blocks are not SD's (the message says what differs).
    """
    sites = unet_attention_sites(model)  # refuses DiTs
    family = model_family(model)
    unet = model.model.diffusion_model
    pairs = {int(n) for n in unet.num_res_blocks}
    if len(pairs) != 1 or min(pairs) < 2:
        raise NotImplementedError(
            f"RAU-Net needs 2+ res blocks on every level, found {list(unet.num_res_blocks)}; "
            "remove the node for this model."
        )
    per_level = pairs.pop() + 1
    levels = len(unet.num_res_blocks)
    first = min(site.level for site in sites if site.block[0] == "input")
    layout = layout_for(family, first, levels)
    rad, pool = layout.raunet.rad_block, layout.raunet.pool_block
    shapes = [_downsampler_shape(unet.input_blocks[(level + 1) * per_level]) for level in range(levels - 1)]
    if shapes[rad] != (3, 2, 1, 1):
        raise NotImplementedError(
            f"RAU-Net needs a 3x3 stride-2 padding-1 downsampler conv after level {rad}, "
            f"found (kernel, stride, padding, dilation) {shapes[rad]}; remove the node."
        )
    blocks = RauNetBlocks(
        family=family,
        layout=layout,
        rad_input=rad * per_level + per_level - 1,
        pool_input=pool * per_level + 1,
        unpool_output=layout.raunet.unpool_block * per_level + 2,
        down_shapes=tuple(DownBlockShape(per_level - 1, shape[:3]) for shape in shapes)
        + (DownBlockShape(per_level - 1, None),),
    )
    attention = {site.block for site in sites}
    if ("input", blocks.pool_input) not in attention or ("output", blocks.unpool_output - 1) not in attention:
        raise NotImplementedError(
            f"RAU-Net pools after attention in input block {blocks.pool_input} and unpools "
            f"after attention in output block {blocks.unpool_output - 1}; this U-Net has "
            "none there. Remove the node for this model."
        )
    return blocks


class _RauNet:
    """The phase of a call and the patch functions, closed over one node's settings (no per-call state)."""

    def __init__(self, config: HiDiffusion, blocks: RauNetBlocks, sampling: Any) -> None:
        self.config, self.blocks, self.sampling = config, blocks, sampling

    def decide(self, transformer_options: dict, latent_hw: tuple[int, int], controlnet: bool) -> RauNetPhase:
        """What acts in the call these ``transformer_options`` belong to."""
        sigma = current_sigma(transformer_options["sigmas"])
        schedule = transformer_options.get("sample_sigmas")  # newer ComfyUI: the run's sigmas, exact steps
        found = locate_timestep(sigma, schedule[:-1]) if schedule is not None else None
        step_index, num_steps = found if found is not None else (None, None)
        clock = SigmaClock(
            self.blocks.family,
            latent_hw=latent_hw,
            step_index=step_index,
            num_steps=num_steps,
            sigma=sigma,
            percent_to_sigma=self.sampling.percent_to_sigma,
        )
        return self.config.raunet_phase(clock, self.blocks.layout, controlnet)

    def phase(self, transformer_options: dict) -> RauNetPhase:
        decided = transformer_options.get(PHASE_KEY)
        if decided is None:  # called without the wrapper (a caller of apply_model): no ControlNet preset
            decided = self.decide(transformer_options, tuple(transformer_options["original_shape"][-2:]), False)
        return decided

    def input_patch(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        """Pool the first pair of the pooled level before its skip is saved."""
        if (
            tuple(transformer_options["block"]) == ("input", self.blocks.pool_input)
            and self.phase(transformer_options).pool
        ):
            return pool_features(h)
        return h

    def after_skip_patch(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        """RAD: the downsampler gets every second row and column (== stride 4, dilation 2 on all)."""
        if (
            tuple(transformer_options["block"]) == ("input", self.blocks.rad_input)
            and self.phase(transformer_options).rad
        ):
            return h[..., ::2, ::2]
        return h

    def output_patch(self, h: torch.Tensor, skip: torch.Tensor, transformer_options: dict):
        """Unpool: bicubic back to the size of the skip saved before pooling (the one this block meets)."""
        if (
            tuple(transformer_options["block"]) == ("output", self.blocks.unpool_output)
            and self.phase(transformer_options).pool
        ):
            return resize_features(h, tuple(skip.shape[-2:])), skip
        return h, skip

    def fit_control(self, control: dict, latent_hw: tuple[int, int], phase: RauNetPhase) -> dict:
        """Control residuals resized to this call's feature sizes (ControlNet: skips, middle; T2I: inputs)."""
        layout = self.blocks.layout.raunet
        skips, mid = down_path_sizes(
            latent_hw,
            self.blocks.down_shapes,
            rad_blocks=frozenset({layout.rad_block} if phase.rad else ()),
            pooled_blocks=frozenset({layout.pool_block} if phase.pool else ()),
        )
        before_patch = list(skips)  # T2I residuals join before the input patch, so before the pool
        before_patch[self.blocks.pool_input] = skips[self.blocks.pool_input - 1]

        def fit(residuals: list, sizes: list) -> list:  # lists line up with the sizes from their end
            offset = len(sizes) - len(residuals)
            return [r if r is None else resize_features(r, sizes[i + offset]) for i, r in enumerate(residuals)]

        fitted = dict(control)
        fitted["output"] = fit(list(control.get("output", [])), skips)
        fitted["middle"] = fit(list(control.get("middle", [])), [mid])
        fitted["input"] = fit(list(control.get("input", [])), before_patch[::-1])  # popped from the end
        return fitted

    def around(self, call: UnetCall, x: torch.Tensor, options: dict, control: Any) -> torch.Tensor:
        """Around each U-Net call (:func:`~.patching.wrap_unet`): decide the phase once, fit control residuals."""
        latent_hw = tuple(x.shape[-2:])
        phase = self.decide(options, latent_hw, controlnet=bool(control and control.get("middle")))
        if control is not None and (phase.rad or phase.pool):
            control = self.fit_control(control, latent_hw, phase)
        return call(x, {**options, PHASE_KEY: phase}, control)


def _ratio(value: float) -> float | None:
    return None if value < 0 else value


class AttnSurgeryHiDiffusion(ModelPatchNode):
    """HiDiffusion's RAU-Net (optionally with MSW-MSA window attention) on an SD1.x/SD2.x/SDXL U-Net."""

    DESCRIPTION = (
        "HiDiffusion RAU-Net against duplicated objects above the native size (SD1.x 512 px, SDXL 1024 px): "
        "in the early steps one level runs at half size (RAD) and one block is pooled, with the presets of "
        "the HiDiffusion package by model and size; ControlNet residuals are resized to match. Optionally also "
        "window attention (MSW-MSA) in the top blocks. " + DIT_LIMITATION
    )

    @classmethod
    def inputs(cls) -> dict[str, Any]:
        ratio = {"default": PRESET, "min": PRESET, "max": 1.0, "step": 0.05}
        return {
            "t1": (
                "FLOAT",
                {
                    **ratio,
                    "tooltip": "Denoising fraction in which the T1 modules act (SD1.x/2.x: "
                    "RAD/RAU, SDXL: block pool); -1: preset for model and size.",
                },
            ),
            "t2": (
                "FLOAT",
                {
                    **ratio,
                    "tooltip": "Denoising fraction in which the T2 modules act (SD1.x/2.x: "
                    "block pool, SDXL: RAD/RAU); -1: preset for model and size.",
                },
            ),
            "aggressive": (
                list(AGGRESSIVE),
                {
                    "default": "preset",
                    "tooltip": "SDXL below 4096 px: RAD first, then the block pool "
                    "(preset: on, off for inpainting models).",
                },
            ),
            "window_attention": (
                "BOOLEAN",
                {
                    "default": False,
                    "tooltip": "Also run the top blocks' self-attention in 2x2 shifted "
                    "windows (MSW-MSA): faster at high resolution.",
                },
            ),
            "shift": (
                SHIFTS,
                {"default": "random", "tooltip": "Window shifts: random (seeded, per layer and step) or always 0-3."},
            ),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Seed of the random shifts."}),
            "force": ("BOOLEAN", {"default": False, "tooltip": "Also act at or below the model's native size."}),
        }

    def patch(
        self,
        model: Any,
        t1: float,
        t2: float,
        aggressive: str,
        window_attention: bool,
        shift: str,
        seed: int,
        force: bool,
    ) -> tuple[Any]:
        """Clone ``model`` and register RAU-Net's block patches, the ControlNet wrapper and the window patches.

        Example (``model`` is a ComfyUI MODEL: not run here, tests/comfy runs the node in ComfyUI):
            >>> (hires,) = AttnSurgeryHiDiffusion().patch(  # doctest: +SKIP
            ...     model, -1, -1, "preset", False, "random", 0, False)
        """
        config = HiDiffusion(
            raunet=True,
            window_attn=window_attention,
            t1=_ratio(t1),
            t2=_ratio(t2),
            aggressive=AGGRESSIVE[aggressive],
            shift=shift if shift == "random" else int(shift),
            seed=seed,
            force=force,
        )
        blocks = raunet_blocks(model)
        if model.model_options.get(OWNER_KEY):
            raise ValueError("RAU-Net is already on this model (an earlier HiDiffusion node); use one node.")
        patched = model.clone()
        patched.model_options[OWNER_KEY] = True
        raunet = _RauNet(config, blocks, model_sampling(model))
        patched.set_model_input_block_patch(raunet.input_patch)
        patched.set_model_input_block_patch_after_skip(raunet.after_skip_patch)
        patched.set_model_output_block_patch(raunet.output_patch)
        wrap_unet(patched, OWNER_KEY, raunet.around)
        if window_attention:
            down, up = blocks.layout.window_blocks
            top = f"down_blocks.{down}.attentions up_blocks.{up}.attentions"
            keys = select_layers(unet_attention_sites(model), top, model_family(model))
            claim_token_layers(patched, keys, "HiDiffusion")
            partition, merge = window_patches(keys, config, blocks.family.native_latent)
            patched.set_model_attn1_patch(partition)
            patched.set_model_attn1_output_patch(merge)
        return (patched,)
