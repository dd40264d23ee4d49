"""The step clock: one place that knows *when* and *where* a denoiser call happens.

A forward pre-hook on the denoiser fills a :class:`StepContext` from the arguments of each call: the
raw timestep, its position in the pipeline scheduler's schedule (so progress is right for DDIM, Euler,
DPM++, flow matching, img2img with strength < 1, interrupted runs and a new step count on the next call),
the latent grid and the batch size. Processors read the context; nobody counts calls.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .families import Family
from .inventory import find_token_grid, token_grids

__all__ = ["StepContext", "locate_timestep", "make_clock_hook"]


@dataclass
class StepContext:
    """Per-call state of one surgery, refreshed before every denoiser call.

    Attributes:
        family: the denoiser's family (patch size, token order).
        timestep: the raw timestep the denoiser received (first batch element), or None before any call;
            ``family.scheduler_timestep`` turns it into the scheduler's t on the 0-1000 scale.
        progress: position in the denoising schedule in [0, 1]: 0 at the first (noisiest) step.
        step_index: index of the current step in the scheduler's schedule, None for a bare denoiser.
        num_steps: number of distinct steps in that schedule, None for a bare denoiser.
        latent_hw: latent grid (rows, cols) in latent cells.
        batch_size: rows in the denoiser's batch (CFG doubles it).
        image_sequence: tokens in the call's image stream where the denoiser takes a token sequence (the
            FLUX-likes' and Qwen-Image's packed latents), None where it takes a latent image or a list.
        roles: per-row roles ("uncond", "cond", "perturbed") when a guidance plugin set them.
    """

    family: Family
    timestep: float | None = None
    progress: float = 0.0
    step_index: int | None = None
    num_steps: int | None = None
    latent_hw: tuple[int, int] | None = None
    batch_size: int | None = None
    image_sequence: int | None = None
    roles: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self._watched: set[float] = set()
        self._answers: dict[float, bool] = {}

    def watch(self, *fractions: float) -> None:
        """Answer :meth:`in_first` for these fractions once per call, before the call (by the clock hook).

        A compiled denoiser whose processors ask ``in_first`` then reads one bool per fraction, which changes
        only when a phase flips; reading the step index instead would recompile it at every step.
        """
        self._watched.update(fractions)

    def answer_watched(self) -> None:
        """Compute :meth:`in_first` of every watched fraction for the call about to run."""
        self._answers = {}
        self._answers = {fraction: self.in_first(fraction) for fraction in self._watched}

    def reset(self) -> None:
        """Forget the last call (what a fresh surgery sees)."""
        self.timestep = None
        self.progress = 0.0
        self.step_index = self.num_steps = None
        self.latent_hw = None
        self.batch_size = self.image_sequence = None
        self.roles = None
        self._answers = {}

    @property
    def image_hw(self) -> tuple[int, int] | None:
        """Requested image size in pixels, derived from the latent grid."""
        if self.latent_hw is None:
            return None
        f = self.family.vae_scale_factor
        return self.latent_hw[0] * f, self.latent_hw[1] * f

    def in_first(self, fraction: float) -> bool:
        """True while the current step lies in the first ``fraction`` of the schedule.

        With a known schedule of N steps this is ``step_index < floor(N * fraction)`` (HiDiffusion's rule);
        for a bare denoiser it falls back to ``progress < fraction``. A watched fraction (:meth:`watch`) is
        answered from what the clock computed before this call.
        """
        answer = self._answers.get(fraction)
        if answer is not None:
            return answer
        if self.step_index is not None and self.num_steps is not None:
            return self.step_index < math.floor(self.num_steps * fraction + 1e-9)
        return self.progress < fraction

    def _seen_latent(self) -> tuple[int, int]:
        if self.latent_hw is None:
            raise RuntimeError("the step clock has not seen a denoiser call yet; no token grid is known")
        return self.latent_hw

    def token_grids(self) -> list[tuple[int, int]]:
        """Image-token grids this call can produce: every U-Net level, or the DiT patch grid."""
        return token_grids(self._seen_latent(), self.family)

    def image_grid(self) -> tuple[int, int]:
        """The image-token grid of this call on a DiT (its patch grid; a U-Net's finest level).

        Raises:
            NotImplementedError: the call's image stream holds tokens besides that grid (a reference image's,
                appended by FluxKontextPipeline or Flux2Pipeline given ``image=``, or Qwen-Image-Edit): what
                assumes one grid would take the wrong tokens for the image.
        """
        rows, cols = self.token_grids()[0]
        if self.image_sequence is not None and self.image_sequence != rows * cols:
            raise NotImplementedError(
                f"this denoiser call's image stream holds {self.image_sequence} tokens, but the image it denoises "
                f"is a {rows}x{cols} grid of {rows * cols}: the pipeline appends other images' tokens to it "
                "(FluxKontextPipeline's and Flux2Pipeline's reference `image`, Qwen-Image-Edit's). "
                "NeighborhoodAttention, TokenMerging, AgentAttention and PerturbedAttention(joint='image_only') "
                "work on one image grid: call the pipeline without a reference image, or leave them out "
                "(PerturbedAttention with joint='full' works with reference images)."
            )
        return rows, cols

    def grid_for(self, num_tokens: int) -> tuple[int, int]:
        """Grid (rows, cols) of an attention call over ``num_tokens`` image tokens.

        Raises:
            ValueError: no level of the current latent holds that many tokens (e.g. a text sequence).
        """
        return find_token_grid(self._seen_latent(), num_tokens, self.family)


def _first_of_runs(values: torch.Tensor) -> torch.Tensor:
    """True where a schedule value starts a run (Heun-style schedulers repeat each one)."""
    keep = torch.ones(len(values), dtype=torch.bool)
    keep[1:] = values[1:] != values[:-1]
    return keep


def _unique_in_order(values: torch.Tensor) -> torch.Tensor:
    """Distinct schedule values in order of first appearance."""
    return values[_first_of_runs(values)]


def _hinted(t: float, schedule: torch.Tensor, hint: int | None, tolerance: float) -> tuple[int, int] | None:
    """``(index, num_steps)`` of the scheduler's own step index when ``t`` agrees with its entry, else None."""
    raw = schedule.detach().double().cpu().flatten()
    if hint is None or not 0 <= hint < len(raw) or abs(float(raw[hint]) - t) > tolerance:
        return None
    keep = _first_of_runs(raw)
    return int(keep[: hint + 1].sum()) - 1, int(keep.sum())


def locate_timestep(
    t: float, schedule: torch.Tensor | None, hint: int | None = None, tolerance: float = 0.0
) -> tuple[int, int] | None:
    """Find ``t`` in a scheduler's timesteps: ``(step_index, num_steps)`` or None when it is not there.

    ``hint`` is the scheduler's own step index when it keeps one (diffusers' flow and multistep schedulers,
    after the first step); it wins when ``t`` lies within ``tolerance`` of its entry. That is what places
    half-precision timesteps of a shifted schedule (FLUX-dev at 2048 px: many entries within one bf16 step
    of each other near t = 1000), where the nearest entry is often the wrong one. Otherwise the nearest entry
    is accepted when it is closer than half the smallest gap between entries; FLUX-scale values (``t / 1000``)
    are tried too, and of the two scales the closer match wins.
    """
    if schedule is None or len(schedule) == 0:
        return None
    hinted = _hinted(t, schedule, hint, tolerance)
    if hinted is not None:
        return hinted
    values = _unique_in_order(schedule.detach().double().cpu().flatten())
    n = len(values)
    min_gap = float((values[1:] - values[:-1]).abs().min()) if n > 1 else 1.0
    best: tuple[float, int] | None = None
    for scale in (1.0, 1e-3):
        diff = (values * scale - t).abs()
        index = int(diff.argmin())
        relative = float(diff[index]) / (min_gap * scale)  # in units of the schedule's spacing
        if relative < 0.5 and (best is None or relative < best[0]):
            best = (relative, index)
    return None if best is None else (best[1], n)


def _first_value(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.flatten()[0]) if value.numel() else None
    return float(value)


def _batch_and_latent(sample: Any, family: Family, bound: dict[str, Any]) -> tuple[int, tuple[int, int]] | None:
    """(batch rows, latent grid) of a call, or None when the sample is neither a tensor nor a list of them."""
    if isinstance(sample, torch.Tensor):
        return int(sample.shape[0]), _latent_hw(sample, family, bound)
    if isinstance(sample, list) and sample and isinstance(sample[0], torch.Tensor):
        return len(sample), (int(sample[0].shape[-2]), int(sample[0].shape[-1]))  # Z-Image: [C, F, H, W] per row
    return None


def _latent_hw(sample: torch.Tensor, family: Family, bound: dict[str, Any]) -> tuple[int, int]:
    if sample.dim() == 4:
        return int(sample.shape[-2]), int(sample.shape[-1])
    img_ids, img_shapes = bound.get("img_ids"), bound.get("img_shapes")
    if img_ids is not None:  # FLUX-likes pack 2x2 latent patches into tokens; img_ids hold (_, row, col, ...)
        ids = img_ids[0] if img_ids.dim() == 3 else img_ids
        ids = ids[ids[:, 0] == ids[0, 0]]  # the target's: reference images follow with another first coordinate
        rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        return rows * family.patch_size, cols * family.patch_size
    if img_shapes:  # Qwen-Image: per row, a list of (frames, token rows, token cols); the first is the target
        _, rows, cols = img_shapes[0][0]
        return rows * family.patch_size, cols * family.patch_size
    raise ValueError(f"cannot infer the latent grid from a sample of shape {tuple(sample.shape)}")


def _rounding(received: Any) -> float:
    """How far a timestep received in this dtype may be from its schedule entry, on the 0-1000 scale
    (two units in the last place of values up to 1000, or of sigmas up to 1 times 1000)."""
    dtype = received.dtype if isinstance(received, torch.Tensor) and received.is_floating_point() else torch.float32
    return 2 * 1000 * torch.finfo(dtype).eps


def make_clock_hook(
    context: StepContext,
    denoiser: torch.nn.Module,
    scheduler: Callable[[], Any],
) -> Callable[..., None]:
    """A ``register_forward_pre_hook(..., with_kwargs=True)`` hook that refreshes ``context``.

    Args:
        context: the context to fill.
        denoiser: the module the hook goes on (its ``forward`` signature names the arguments).
        scheduler: returns the pipeline's *current* scheduler (users swap schedulers), or None.
    """
    signature = inspect.signature(type(denoiser).forward)
    names = [p for p in signature.parameters if p != "self"]
    sample_name = names[0]

    def clock_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        bound = dict(zip(names, args))
        bound.update(kwargs)
        received = bound.get("timestep", bound.get("t"))  # Z-Image names its timestep `t`
        t = _first_value(received)
        context.timestep = t
        context.roles = None
        seen = _batch_and_latent(bound.get(sample_name), context.family, bound)
        if seen is not None:
            context.batch_size, context.latent_hw = seen
        sample = bound.get(sample_name)
        sequence = isinstance(sample, torch.Tensor) and sample.dim() == 3
        context.image_sequence = int(sample.shape[1]) if sequence else None
        # the pipelines pass t, t / 1000 (FLUX-likes, Qwen-Image) or 1 - t / 1000 (Z-Image): undo that first
        t_1000 = None if t is None else context.family.scheduler_timestep(t)
        current = scheduler()
        found = None
        if t_1000 is not None:
            hint = getattr(current, "step_index", None)
            found = locate_timestep(t_1000, getattr(current, "timesteps", None), hint, _rounding(received))
        if found is not None:
            context.step_index, context.num_steps = found
            context.progress = found[0] / found[1]
        else:
            context.step_index = context.num_steps = None
            context.progress = 0.0 if t_1000 is None else min(1.0, max(0.0, 1.0 - t_1000 / 1000.0))
        context.answer_watched()

    return clock_hook
