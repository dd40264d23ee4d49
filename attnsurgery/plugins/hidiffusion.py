"""HiDiffusion for U-Nets: RAU-Net against object duplication, MSW-MSA for speed at high resolution.

Paper: "HiDiffusion: Unlocking High-Resolution Creativity and Efficiency in Low-Resolution Trained
Diffusion Models" (ECCV 2024). Constants follow the `hidiffusion` 0.1.10 package; differences on
purpose: time comes from the step clock (not call counters), sizes at or below the model's native
resolution are left alone unless forced, odd sizes are padded instead of resampled, shifts come from
a private generator, and `remove()` leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..ops.windows import NUM_SHIFTS, WindowGrid, draw_shift_index, shift_for_index
from ..processors.raunet import RauNetHooks, RauNetLayout, RauNetPhase
from ..processors.window_attention import WindowAttentionProcessor, WindowPlan
from ..rng import CallInt
from .base import Plugin

if TYPE_CHECKING:
    from ..context import StepContext
    from ..families import Family
    from ..surgery import Surgery

__all__ = [
    "HiDiffusion",
    "HiDiffusionLayout",
    "RauNetTiming",
    "check_raunet_sites",
    "layout_for",
    "preset_timing",
    "unet_layout",
]

SHIFT_MODES = ("random", "cycle")
AGGRESSIVE_FRACTION = 8 / 50  # package: RAD/RAU only for the first 8 of 50 steps in aggressive mode
FEW_STEPS = 4  # SDXL-Turbo-like use: 1-4 steps get the Turbo preset


@dataclass(frozen=True)
class HiDiffusionLayout:
    """Where HiDiffusion acts in one U-Net: RAU-Net sites, window-attention blocks, which ratio drives what.

    Args:
        raunet: RAD/RAU and pool/unpool block indices.
        window_blocks: `(down block, up block)` whose self-attention runs in windows.
        rad_follows_t1: SD1.x/2.x: RAD/RAU follow T1 and pool/unpool T2; SDXL: the reverse.
    """

    raunet: RauNetLayout
    window_blocks: tuple[int, int]
    rad_follows_t1: bool


def _first_attention_block(unet: torch.nn.Module) -> int:
    for index, block in enumerate(unet.down_blocks):
        if getattr(block, "attentions", None):
            return index
    raise NotImplementedError("HiDiffusion needs a U-Net with cross-attention down blocks; this one has none.")


def _check_downsampler(unet: torch.nn.Module, index: int) -> None:
    block = unet.down_blocks[index]
    downsampler = block.downsamplers[0] if getattr(block, "downsamplers", None) else None
    conv = getattr(downsampler, "conv", None)
    conv = getattr(conv, "base_layer", conv)
    shape = None if conv is None else (conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    if shape != ((3, 3), (2, 2), (1, 1), (1, 1)) or getattr(downsampler, "padding", 1) == 0:
        raise NotImplementedError(
            f"RAU-Net needs down_blocks.{index} to end in a 3x3 stride-2 padding-1 conv, found {shape}; "
            "use HiDiffusion(raunet=False) for this U-Net."
        )


def check_raunet_sites(unet: torch.nn.Module, layout: RauNetLayout) -> None:
    """RAU-Net's hooks assume SD's block structure there; refuse anything else with the way out."""
    _check_downsampler(unet, layout.rad_block)
    pool, unpool = unet.down_blocks[layout.pool_block], unet.up_blocks[layout.unpool_block]
    rau = unet.up_blocks[layout.rau_block]
    if (
        not getattr(pool, "attentions", None)
        or len(getattr(unpool, "attentions", ())) < 2
        or not getattr(rau, "upsamplers", None)
    ):
        raise NotImplementedError(
            f"RAU-Net needs attention in down_blocks.{layout.pool_block}, two attentions in "
            f"up_blocks.{layout.unpool_block} and an upsampler in up_blocks.{layout.rau_block}; "
            "use HiDiffusion(raunet=False) for this U-Net."
        )


def unet_layout(unet: torch.nn.Module, family: Family) -> HiDiffusionLayout:
    """Read HiDiffusion's sites from a diffusers U-Net's block structure (see `layout_for`).

    Raises:
        NotImplementedError: the family or the block structure is not one HiDiffusion supports.
    """
    _check_family(family)
    return layout_for(family, _first_attention_block(unet), len(unet.down_blocks))


def _check_family(family: Family) -> None:
    if family.kind != "unet" or family.name not in ("sd15", "sd2", "sdxl", "sdxl-inpaint"):
        raise NotImplementedError(
            f"HiDiffusion supports SD1.x, SD2.x and SDXL U-Nets, not {family.name}; remove it for this model."
        )


def layout_for(family: Family, first_attention_block: int, num_blocks: int) -> HiDiffusionLayout:
    """HiDiffusion's sites from the level structure alone (per family in docs/techniques/hidiffusion.md).

    SD1.x/2.x (attention from the first block): RAD at that block, pool in the next one. SDXL (first
    block without attention): pool and RAD both in the first attention block.

    Args:
        family: The U-Net's family (SD1.x, SD2.x, SDXL).
        first_attention_block: Index of the first down block (level) holding attention.
        num_blocks: Number of down blocks (levels).

    Raises:
        NotImplementedError: the family is not one HiDiffusion supports.

    Example:
        >>> from attnsurgery.families import Family
        >>> sd15 = Family("sd15", "unet", native_resolution=512, vae_scale_factor=8)
        >>> layout_for(sd15, first_attention_block=0, num_blocks=4).raunet.pool_block
        1
    """
    _check_family(family)
    first = first_attention_block
    sdxl = family.name.startswith("sdxl")
    return HiDiffusionLayout(
        raunet=RauNetLayout(num_blocks, rad_block=first, pool_block=first if sdxl else first + 1),
        window_blocks=(first, num_blocks - 1 - first),
        rad_follows_t1=not sdxl,
    )


@dataclass(frozen=True)
class RauNetTiming:
    """T1/T2 ratios and the aggressive switch for one call (a module with ratio r acts while step < floor(N*r))."""

    t1: float
    t2: float
    aggressive: bool


def preset_timing(family: Family, latent_hw: tuple[int, int], num_steps: int | None, controlnet: bool) -> RauNetTiming:
    """The package's presets, by family and latent size relative to native (table in docs/techniques/hidiffusion.md).

    The peer writes the thresholds as absolute latent sides (256 for SD1.x, 512 for SDXL): 4x their native
    latents. Measured against the native latent they mean the same for those models and the right thing for a
    model of another native size (the 64 px reference gets its 4x timing at 256 px, not SD1.5's 2x timing).

    Example:
        >>> from attnsurgery.families import Family
        >>> sd15 = Family("sd15", "unet", native_resolution=512, vae_scale_factor=8)
        >>> preset_timing(sd15, (256, 256), 50, controlnet=False)
        RauNetTiming(t1=0.7, t2=0.3, aggressive=False)
    """
    below_4x = min(latent_hw) < 4 * family.native_latent
    if family.name in ("sd15", "sd2"):
        return RauNetTiming(0.4, 0.0, False) if below_4x else RauNetTiming(0.7, 0.3, False)
    if num_steps is not None and num_steps <= FEW_STEPS:
        return RauNetTiming(0.5, 0.0, False)  # SDXL-Turbo
    if below_4x:
        return RauNetTiming(0.5 if controlnet else 0.4, 0.0, aggressive=not family.inpaint)
    return RauNetTiming(0.7, 0.3, False)


def _check_ratio(name: str, value: float | None) -> None:
    if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"HiDiffusion({name}={value!r}): a ratio of the denoising steps in [0, 1], or None.")


@dataclass(frozen=True)
class HiDiffusion(Plugin):
    """HiDiffusion (RAU-Net + MSW-MSA) for SD1.x, SD2.x and SDXL U-Nets at above-native resolutions.

    Args:
        raunet: Resize features in the early steps (RAD/RAU and block pool/unpool) against duplication.
        window_attn: Run the top blocks' self-attention in 2x2 shifted windows (MSW-MSA), ~4x fewer FLOPs.
        t1: Ratio of steps for the T1 modules (None: preset by family and size).
        t2: Ratio of steps for the T2 modules (None: preset).
        aggressive: SDXL below 4096 px: RAD/RAU first, then pool/unpool (None: preset, off for inpainting).
        shift: Window shifts: "random" (private generator, per layer and step), "cycle" (step % 4),
            or a fixed shift index 0..3.
        seed: Seed of the shift generator (None: the surgery's seed).
        force: Also act at or below the native resolution (off by default: nothing to fix there).

    Time comes from the step clock, so with img2img/inpainting at strength s < 1 the schedule starts
    at step N - floor(N * s), and RAU-Net acts only in the part of its first T1 fraction that runs
    (the package restarts its counters at the first executed step instead).

    Example (a 2048 px image: minutes on a CPU, so the suite skips it):
        >>> import attnsurgery as surg
        >>> with surg.patched(pipe, surg.HiDiffusion()):  # doctest: +SKIP
        ...     image = pipe("a castle", height=2048, width=2048).images[0]
    """

    raunet: bool = True
    window_attn: bool = True
    t1: float | None = None
    t2: float | None = None
    aggressive: bool | None = None
    shift: str | int = "random"
    seed: int | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if not (self.raunet or self.window_attn):
            raise ValueError("HiDiffusion(raunet=False, window_attn=False) does nothing; enable at least one.")
        _check_ratio("t1", self.t1)
        _check_ratio("t2", self.t2)
        if self.aggressive not in (None, True, False):
            raise ValueError(f"HiDiffusion(aggressive={self.aggressive!r}): use True, False or None (preset).")
        fixed = isinstance(self.shift, int) and not isinstance(self.shift, bool)
        if not (self.shift in SHIFT_MODES or (fixed and 0 <= self.shift < NUM_SHIFTS)):
            raise ValueError(
                f"HiDiffusion(shift={self.shift!r}): use 'random', 'cycle' or a shift index 0..{NUM_SHIFTS - 1}."
            )
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"HiDiffusion(seed={self.seed!r}): an integer or None.")

    # -- when --------------------------------------------------------------------------------------
    def engaged(self, context: StepContext) -> bool:
        """Active for this call: the latent exceeds the native size on some side, or `force`."""
        if context.latent_hw is None:
            return False
        return self.force or max(context.latent_hw) > context.family.native_latent

    def timing(self, context: StepContext, controlnet: bool) -> RauNetTiming:
        """Preset timing for this call with the user's overrides."""
        preset = preset_timing(context.family, context.latent_hw, context.num_steps, controlnet)
        return RauNetTiming(
            preset.t1 if self.t1 is None else self.t1,
            preset.t2 if self.t2 is None else self.t2,
            preset.aggressive if self.aggressive is None else self.aggressive,
        )

    def raunet_phase(self, context: StepContext, layout: HiDiffusionLayout, controlnet: bool) -> RauNetPhase:
        """Which RAU-Net parts act in the current step."""
        if not self.engaged(context):
            return RauNetPhase()
        timing = self.timing(context, controlnet)
        if timing.aggressive:  # T2 modules first, then T1 modules until T1
            early = context.in_first(AGGRESSIVE_FRACTION)
            t2_on, t1_on = early, not early and context.in_first(timing.t1)
        else:
            t1_on, t2_on = context.in_first(timing.t1), context.in_first(timing.t2)
        rad, pool = (t1_on, t2_on) if layout.rad_follows_t1 else (t2_on, t1_on)
        return RauNetPhase(engaged=True, rad=rad, pool=pool)

    def shift_index(self, surgery: Surgery, path: str) -> int:
        """This call's shift for one layer: a pure function of (seed, layer, step), no shared state."""
        if not isinstance(self.shift, str):
            return self.shift
        context = surgery.context
        step = context.step_index if context.step_index is not None else int(context.timestep or 0)
        if self.shift == "cycle":
            return step % NUM_SHIFTS
        return draw_shift_index(surgery.generator("hidiffusion.shift", path, step, seed=self.seed))

    # -- where -------------------------------------------------------------------------------------
    def attach(self, surgery: Surgery) -> None:
        """Hook RAU-Net into the U-Net's blocks and wrap the top blocks' self-attention in windows."""
        layout = unet_layout(surgery.denoiser, surgery.model.family)
        if self.raunet:
            check_raunet_sites(surgery.denoiser, layout.raunet)

            def phase(controlnet: bool) -> RauNetPhase:
                return self.raunet_phase(surgery.context, layout, controlnet)

            sites = (
                f"down_blocks.{layout.raunet.rad_block}",
                f"down_blocks.{layout.raunet.pool_block}",
                f"up_blocks.{layout.raunet.rau_block}",
                f"up_blocks.{layout.raunet.unpool_block}",
            )
            for site in dict.fromkeys(sites):
                surgery.claim(site, "blocks")
            RauNetHooks(surgery.denoiser, layout.raunet, phase).attach(surgery)
        if self.window_attn:
            down, up = layout.window_blocks
            selector = [f"down_blocks.{down}.attentions", f"up_blocks.{up}.attentions"]
            for layer in surgery.model.select(selector, kinds=("self",)):
                inner = layer.module.processor
                processor = WindowAttentionProcessor(inner, self._window_plan(surgery, layer.path))
                surgery.set_processor(layer, processor, role="tokens")

    def _window_plan(self, surgery: Surgery, path: str) -> WindowPlan:
        """Per call: no windows unless engaged; else a 2x2 grid over the layer's tokens with this call's shift.

        A drawn or cycling shift is chosen before the call and reaches the windows as a tensor, so a compiled
        U-Net keeps one graph across steps; a fixed shift stays a constant.
        """
        context = surgery.context
        drawn = None
        if isinstance(self.shift, str):
            drawn = CallInt(lambda: self.shift_index(surgery, path) if self.engaged(context) else 0)
            surgery.per_call(drawn.refresh)

        def plan(num_tokens: int) -> WindowGrid | None:
            if not self.engaged(context):
                return None
            height, width = context.grid_for(num_tokens)
            grid = WindowGrid(height, width, rows=min(2, height), cols=min(2, width))
            if drawn is None:
                return WindowGrid(height, width, grid.rows, grid.cols, shift_for_index(grid.window, self.shift))
            step = torch.tensor([grid.window[0] // 4, grid.window[1] // 4])
            return WindowGrid(height, width, grid.rows, grid.cols, shift_by=drawn.value * step)

        return plan
