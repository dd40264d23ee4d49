"""Perturbation guidance as a wrapper on the denoiser: no pipeline class is forked.

The denoiser's forward pre-hook appends perturbed copies of the conditional rows (batched mode), the
forward hook splits them off again and folds their prediction into the rows the pipeline sees. Sequential
mode runs the conditional rows once more through the denoiser with the perturbation on, instead.

How the term reaches the pipeline's own guidance line (the target: eps = eps_u + w (eps_c - eps_u) + s_t d
with d = eps_c - eps_p, or eps_c + s_t d without CFG): we add s_t d to *every* prediction of the same prompt
at that step, conditional and unconditional alike. Any guidance combination whose weights sum to one (CFG:
(1 - w) eps_u + w eps_c; FLUX true CFG, a separate unconditional call; SD3 skip-layer guidance, whose extra
term is a difference) then gains exactly s_t d, so the wrapper needs neither w nor the combination itself.
(The alternative, eps_c + (s_t / w) d on the conditional rows only, needs w, which FluxPipeline keeps
in a local variable.) What the wrapper must know is which rows are conditional, from the family's `cfg_layout`:
- "uncond_cond" (SD, SDXL, SD3): one batch [uncond, cond] while the pipeline's `do_classifier_free_guidance`
  property (read at call time) is true, else conditional rows only;
- "cond_uncond" (Z-Image): one batch [cond, uncond] (a list of per-row latents) while CFG runs;
- "separate" (FLUX true CFG, FLUX.2 Klein, Qwen-Image, Chroma): every call that starts a step is conditional;
  the pipeline's unconditional pass is a further call at that step (below), whatever text length or attention
  mask it brings.
A bare denoiser is taken to run conditional rows only.
With `guidance_rescale` > 0 the pipeline's rescale sees eps_c + s_t d as the text prediction (diffusers' PAG
pipelines pass eps_c); without it the results agree. Qwen-Image's true CFG rescales the combination to the norm
of the conditional prediction, here eps_c + s_t d: the term is folded in before that rescale, as CFG's is.
A further call at the same step (same timestep and the same noisy-input tensor object: the unconditional pass
of a "separate" layout, SD3's skip-layer pass) gets the stored shift without new perturbed rows.
Batched inputs are tensors with the batch first, and the per-row lists named in `_PER_ROW_LISTS`.

diffusers' caches (``transformer.enable_cache(...)``): FirstBlockCache, TaylorSeer, MagCache and the like keep
their state per cache context, which the pipelines set per call (``cache_context("cond")``, ``"uncond"``); the
perturbed pass gets a context of its own, or it would reuse the conditional pass's cache and add nothing. Under
such a cache the perturbed rows always take that pass, in batched mode too: a cache holds one batch per context,
and appended rows that come and go with the schedule (``start``/``stop``) turned FirstBlockCache's one-row
prediction into two rows. PyramidAttentionBroadcast and FasterCache keep one state for every call: the perturbed
rows would read the conditional rows' cached attention, or clash with another call's batch, so they are refused,
at apply and at every call (a cache enabled after apply).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from ..families import CfgLayout
from .processor import PerturbationState

# Denoiser arguments that are not batched even though they are tensors (the FLUX-likes' position ids).
_UNBATCHED_KWARGS = frozenset({"img_ids", "txt_ids"})
# Denoiser arguments that are Python lists with one entry per batch row: Z-Image's latents and captions (its
# batch is a list), Qwen-Image's image shapes.
_PER_ROW_LISTS = frozenset({"x", "cap_feats", "img_shapes"})
_TIMESTEP_NAMES = ("timestep", "t")  # Z-Image names its timestep `t`
# diffusers cache configs whose hooks keep one state for every denoiser call, whatever its cache context
_CONTEXT_BLIND_CACHES = frozenset({"PyramidAttentionBroadcastConfig", "FasterCacheConfig"})
_PERTURBED_CACHE_CONTEXT = "attnsurgery-perturbed"


def check_cache(denoiser: torch.nn.Module) -> None:
    """Refuse a diffusers cache that would serve the perturbed rows the conditional rows' cache.

    Raises:
        RuntimeError: the denoiser has PyramidAttentionBroadcast or FasterCache enabled.
    """
    config = getattr(denoiser, "_cache_config", None)  # set by CacheMixin.enable_cache
    if type(config).__name__ in _CONTEXT_BLIND_CACHES:
        raise RuntimeError(
            f"PerturbedAttention cannot run under {type(config).__name__}: that cache keeps one attention output "
            "per layer for every denoiser call (no per-call cache context), so the perturbed rows would be served "
            "the conditional rows' cached attention, or clash with another call's batch. Call "
            "transformer.disable_cache(), or cache with FirstBlockCacheConfig, TaylorSeerCacheConfig or "
            "MagCacheConfig, which keep a cache per call."
        )


def _caching(denoiser: torch.nn.Module) -> bool:
    """Whether a diffusers cache (CacheMixin.enable_cache) is on."""
    return bool(getattr(denoiser, "is_cache_enabled", False))


def _own_cache_context(denoiser: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The perturbed pass's own diffusers cache context, when a cache is on. (diffusers clears the context on
    leaving; the pipelines make one denoiser call per context, and this pass comes last in it.)"""
    if _caching(denoiser):
        return denoiser.cache_context(_PERTURBED_CACHE_CONTEXT)
    return contextlib.nullcontext()


#: The diffusers pipelines (or their subclasses) whose CFG layout the wrapper was checked against, by the family
#: layout they follow; tests/plugins/test_guided_pipelines.py guides each variant. Others are refused: the SD
#: upscaler has no `do_classifier_free_guidance` property, the instruct-pix2pix pipelines batch three parts, and
#: the rest (Qwen-Image-Edit, FLUX Control, ...) have not been checked.
GUIDED_PIPELINES: dict[CfgLayout, frozenset[str]] = {
    "uncond_cond": frozenset(
        {
            "StableDiffusionPipeline",
            "StableDiffusionImg2ImgPipeline",
            "StableDiffusionInpaintPipeline",
            "StableDiffusionControlNetPipeline",
            "StableDiffusionControlNetImg2ImgPipeline",
            "StableDiffusionControlNetInpaintPipeline",
            "StableDiffusionXLPipeline",
            "StableDiffusionXLImg2ImgPipeline",
            "StableDiffusionXLInpaintPipeline",
            "StableDiffusionXLControlNetPipeline",
            "StableDiffusionXLControlNetImg2ImgPipeline",
            "StableDiffusionXLControlNetInpaintPipeline",
            "StableDiffusion3Pipeline",
            "StableDiffusion3Img2ImgPipeline",
            "StableDiffusion3InpaintPipeline",
            "StableDiffusion3ControlNetPipeline",
            "StableDiffusion3ControlNetInpaintingPipeline",
            "StableDiffusionDepth2ImgPipeline",
        }
    ),
    "cond_uncond": frozenset({"ZImagePipeline"}),
    "separate": frozenset(
        {
            "FluxPipeline",
            "FluxImg2ImgPipeline",
            "FluxInpaintPipeline",
            "FluxControlNetPipeline",
            "FluxControlNetImg2ImgPipeline",
            "FluxControlNetInpaintPipeline",
            "FluxKontextPipeline",
            "FluxKontextInpaintPipeline",
            "FluxFillPipeline",
            "Flux2Pipeline",
            "QwenImagePipeline",
            "QwenImageImg2ImgPipeline",
            "QwenImageInpaintPipeline",
            "ChromaPipeline",
            "ChromaImg2ImgPipeline",
        }
    ),
}
_CFG_FLAG = "do_classifier_free_guidance"


def check_guided_pipeline(pipeline: Any, layout: CfgLayout) -> None:
    """Refuse a pipeline whose guidance layout the wrapper cannot see (None, a bare denoiser, is fine: every row
    is conditional). A stand-in that is no diffusers pipeline must declare `do_classifier_free_guidance` where
    the layout batches CFG rows; it is read at every call.

    Raises:
        NotImplementedError: naming the pipeline and the supported ones.
    """
    if pipeline is None:
        return
    names = {cls.__name__ for cls in type(pipeline).__mro__}
    if "DiffusionPipeline" not in names:
        if layout == "separate" or inspect.getattr_static(pipeline, _CFG_FLAG, None) is not None:
            return
        problem = f"has no `{_CFG_FLAG}` attribute to say when its denoiser batches [uncond, cond] rows"
    elif names & GUIDED_PIPELINES[layout]:
        return
    else:
        problem = "lays out classifier-free guidance in a way perturbation guidance cannot see"
    supported = ", ".join(sorted(GUIDED_PIPELINES[layout]))
    raise NotImplementedError(
        f"{type(pipeline).__name__} {problem}, so the perturbed rows would be the wrong ones. On this model "
        f"guidance plugins support {supported} (and their subclasses), or a bare denoiser (every row taken as "
        "conditional). Use one of those, or leave perturbation guidance out of this pipeline."
    )


@dataclass(frozen=True)
class GuidanceSchedule:
    """s_t over the run: diffusers' adaptive scale and a progress window.

    Args:
        scale: s, the guidance scale.
        adaptive_scale: a in s_t = max(0, s - a (1000 - t)) (diffusers' PAG pipelines; 0 disables it).
        start: first progress (0 = first step) at which the guidance runs.
        stop: progress after which it stops; 1.0 runs to the end (the legacy PAG pipelines' default).
    """

    scale: float
    adaptive_scale: float = 0.0
    start: float = 0.0
    stop: float = 1.0

    def at(self, progress: float, timestep: float) -> float:
        """s_t for a step at `progress` in [0, 1] with a timestep on the 0-1000 scale."""
        if not self.start <= progress <= self.stop:
            return 0.0
        return max(0.0, self.scale - self.adaptive_scale * (1000.0 - timestep))


@dataclass
class _StepMemo:
    """The last guided step: its timestep, its noisy-input tensor (held, so that its identity cannot be
    reused) and its per-prompt shift s_t d, for further calls at the same step."""

    timestep: torch.Tensor
    sample: torch.Tensor
    shift: torch.Tensor


class PerturbationGuidance:
    """The hooks of the guidance wrapper; the plugin registers `pre_hook` and `post_hook` on the denoiser.

    Args:
        state: the state shared with the layers' perturbation processors.
        head_weights: returns layer path -> [rows, heads] weights for this call (one row broadcasts to every
            perturbed row; HeadHunter passes one row per candidate head set).
        schedule: s_t.
        sequential: one extra denoiser pass for the perturbed rows instead of a bigger batch (always so under
            a diffusers cache).
        clock: returns (progress in [0, 1], timestep on the 0-1000 scale) of the current call.
        cfg_active: returns whether the pipeline runs classifier-free guidance at the current call.
        cfg_layout: how CFG sits in the calls (see the module docstring).
        image_tokens: returns the number of image tokens of the call (for joint="image_only"), or None.
    """

    def __init__(
        self,
        state: PerturbationState,
        head_weights: Callable[[], Mapping[str, torch.Tensor]],
        schedule: GuidanceSchedule,
        sequential: bool,
        clock: Callable[[], tuple[float, float]],
        cfg_active: Callable[[], bool],
        image_tokens: Callable[[], int | None],
        cfg_layout: CfgLayout = "uncond_cond",
    ) -> None:
        self.state = state
        self.head_weights = head_weights
        self.schedule = schedule
        self.sequential = sequential
        self.clock = clock
        self.cfg_active = cfg_active
        self.cfg_layout = cfg_layout
        self.image_tokens = image_tokens
        self._nested = False
        self._call: dict[str, Any] | None = None
        self._memo: _StepMemo | None = None

    # ----------------------------------------------------------------------------------------- hooks
    def pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Decide this call's role and, in batched mode, append the perturbed rows."""
        if self._nested:
            return None
        self._call = None
        self.state.deactivate()  # in case the previous call raised before its forward hook ran
        check_cache(module)
        names = _parameter_names(type(module))
        sample = _sample_of(args, kwargs, names)
        batch = _batch_of(sample)
        progress, timestep = self.clock()
        scale = self.schedule.at(progress, timestep)
        if scale == 0.0:
            return None
        if self._repeats_last_step(args, kwargs, names, sample):
            self._call = {"repeat": True}
            return None
        cond = _cond_rows(batch, self.cfg_layout != "separate" and self.cfg_active(), self.cfg_layout)
        sequential = self.sequential or _caching(module)  # a cache holds one batch per context
        self._call = {
            "repeat": False,
            "scale": scale,
            "batch": batch,
            "cond": cond,
            "args": args,
            "kwargs": kwargs,
            "sequential": sequential,
        }
        if sequential:
            return None
        perturbed = cond.stop - cond.start
        self.state.activate(range(batch, batch + perturbed), self.head_weights(), self.image_tokens())
        return _call_with_rows(args, kwargs, names, batch, cond, append=True)

    def post_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Split off the perturbed rows and add s_t (eps_c - eps_p) to every row of the prompt."""
        if self._nested or self._call is None:
            return None
        call, self._call = self._call, None
        self.state.deactivate()
        eps = _sample_out(output)
        if call["repeat"]:
            return _replace_sample(output, eps + _tile(self._memo.shift, eps.shape[0]))
        batch, cond = call["batch"], call["cond"]
        if call["sequential"]:
            eps_p = self._perturbed_pass(module, call)
        else:
            eps, eps_p = eps[:batch], eps[batch:]
        shift = call["scale"] * (eps[cond] - eps_p)
        args, kwargs, names = call["args"], call["kwargs"], _parameter_names(type(module))
        self._memo = _StepMemo(_timestep_of(args, kwargs, names), _sample_of(args, kwargs, names), shift)
        return _replace_sample(output, eps + _tile(shift, batch))

    # ------------------------------------------------------------------------------------- helpers
    def _perturbed_pass(self, module: torch.nn.Module, call: dict[str, Any]) -> torch.Tensor:
        """The conditional rows once more, all of them perturbed (peak memory: the smaller batch)."""
        names = _parameter_names(type(module))
        args, kwargs = _call_with_rows(call["args"], call["kwargs"], names, call["batch"], call["cond"], append=False)
        self.state.activate(range(call["cond"].stop - call["cond"].start), self.head_weights(), self.image_tokens())
        self._nested = True
        try:
            with _own_cache_context(module):
                return _sample_out(module(*args, **kwargs))
        finally:
            self._nested = False
            self.state.deactivate()

    def _repeats_last_step(self, args: tuple, kwargs: dict, names: tuple[str, ...], sample: Any) -> bool:
        """Whether this call predicts again at the step just guided: the pipeline hands over the very same
        noisy-input tensor (FLUX's unconditional pass, SD3's skip-layer pass) at the same timestep. Object
        identity, not equal values: a new run with the same seed starts from a new tensor."""
        memo = self._memo
        if memo is None or sample is not memo.sample or _batch_of(sample) % memo.shift.shape[0]:
            return False
        timestep = _timestep_of(args, kwargs, names)
        return timestep.flatten()[:1].tolist() == memo.timestep.flatten()[:1].tolist()


def _tile(shift: torch.Tensor, batch: int) -> torch.Tensor:
    """The per-prompt shift repeated over a batch of [uncond, cond] (or further) groups of prompts."""
    return shift.repeat(batch // shift.shape[0], *[1] * (shift.ndim - 1))


def _cond_rows(batch: int, cfg: bool, layout: CfgLayout) -> slice:
    """The conditional rows: one half of a CFG batch ([uncond, cond] or [cond, uncond]), else all of them."""
    if not cfg:
        return slice(0, batch)
    if batch % 2:
        halves = "[cond, uncond]" if layout == "cond_uncond" else "[uncond, cond]"
        raise RuntimeError(
            f"the pipeline reports classifier-free guidance but the denoiser got an odd batch of {batch}; "
            f"perturbation guidance expects {halves} halves"
        )
    return slice(0, batch // 2) if layout == "cond_uncond" else slice(batch // 2, batch)


@lru_cache(maxsize=32)
def _parameter_names(denoiser_class: type) -> tuple[str, ...]:
    """The denoiser's forward parameters in order, to name positional arguments."""
    return tuple(p for p in inspect.signature(denoiser_class.forward).parameters if p != "self")


def _call_with_rows(
    args: tuple, kwargs: dict, names: tuple[str, ...], batch: int, rows: slice, append: bool
) -> tuple[tuple, dict]:
    """A denoiser call's arguments with the batch rows `rows` appended (or only those rows kept)."""

    def one(name: str, value: Any) -> Any:
        if name in _UNBATCHED_KWARGS:
            return value
        if name in _PER_ROW_LISTS and isinstance(value, list) and len(value) == batch:
            return value + value[rows] if append else value[rows]
        return _with_rows(value, batch, rows, append)

    new_args = tuple(one(name, value) for name, value in zip(names, args))
    return new_args, {key: one(key, value) for key, value in kwargs.items()}


def _with_rows(value: Any, batch: int, rows: slice, append: bool) -> Any:
    """Every batched tensor in `value` (nested tuples, lists, dicts) with rows appended or selected."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 or value.shape[0] != batch:
            return value
        return torch.cat([value, value[rows]]) if append else value[rows]
    if isinstance(value, dict):
        return {key: _with_rows(item, batch, rows, append) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_with_rows(item, batch, rows, append) for item in value]
        return type(value)(items) if isinstance(value, list) or type(value) is tuple else type(value)(*items)
    return value


def _argument(args: tuple, kwargs: dict, names: tuple[str, ...], name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    index = names.index(name) if name in names else len(args)
    return args[index] if index < len(args) else None


def _sample_of(args: tuple, kwargs: dict, names: tuple[str, ...]) -> torch.Tensor | list[torch.Tensor]:
    """The noisy input, the denoiser's first parameter: a tensor, or (Z-Image) a list of per-row tensors."""
    sample = _argument(args, kwargs, names, names[0])
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(sample, list) and sample and all(isinstance(row, torch.Tensor) for row in sample):
        return sample
    raise NotImplementedError(
        f"perturbation guidance cannot read the batch of this denoiser call: its `{names[0]}` is "
        f"{type(sample).__name__}{' of lists' if isinstance(sample, list) else ''}, not a tensor or a list of "
        "tensors (Z-Image's omni/edit mode is not supported); use a text-to-image pipeline"
    )


def _batch_of(sample: torch.Tensor | list[torch.Tensor]) -> int:
    return len(sample) if isinstance(sample, list) else int(sample.shape[0])


def _timestep_of(args: tuple, kwargs: dict, names: tuple[str, ...]) -> torch.Tensor:
    """The timestep argument as a tensor."""
    name = next((n for n in _TIMESTEP_NAMES if n in names or n in kwargs), _TIMESTEP_NAMES[0])
    return torch.as_tensor(_argument(args, kwargs, names, name))


def _sample_out(output: Any) -> torch.Tensor:
    """The prediction inside a denoiser output (tuple, ModelOutput or tensor); Z-Image's per-row list of
    predictions (one image size per call) is stacked."""
    if isinstance(output, tuple):
        output = output[0]
    elif not isinstance(output, (torch.Tensor, list)):
        output = output.sample
    return torch.stack(output) if isinstance(output, list) else output


def _replace_sample(output: Any, sample: torch.Tensor) -> Any:
    """The same kind of output holding `sample` (a list of rows again where the denoiser returned a list)."""
    if isinstance(output, tuple):
        return (_replace_sample(output[0], sample), *output[1:])
    if isinstance(output, list):
        return list(sample.unbind(0))
    if isinstance(output, torch.Tensor):
        return sample
    output.sample = _replace_sample(output.sample, sample)
    return output
