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
in a local variable.) What the wrapper must know is which rows are conditional: it reads the pipeline's
`do_classifier_free_guidance` property at call time (SD, SDXL, SD3 pipelines batch [uncond, cond] when it
is true); a pipeline without that property (FLUX) or a bare denoiser is taken to run conditional rows only.
With `guidance_rescale` > 0 the pipeline's rescale sees eps_c + s_t d as the text prediction (diffusers' PAG
pipelines pass eps_c); without it the results agree.
A further call at the same step (same timestep and the same noisy-input tensor object: FLUX's unconditional
pass, SD3's skip-layer pass) gets the stored shift without new perturbed rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .processor import PerturbationState

# Denoiser kwargs that are not batched even though they are tensors (FLUX's 2-D position ids).
_UNBATCHED_KWARGS = frozenset({"img_ids", "txt_ids"})
_SAMPLE_KWARGS = ("sample", "hidden_states")


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
        sequential: one extra denoiser pass for the perturbed rows instead of a bigger batch.
        clock: returns (progress in [0, 1], timestep on the 0-1000 scale) of the current call.
        cfg_active: returns whether the pipeline batches [uncond, cond] right now.
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
    ) -> None:
        self.state = state
        self.head_weights = head_weights
        self.schedule = schedule
        self.sequential = sequential
        self.clock = clock
        self.cfg_active = cfg_active
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
        sample = _sample_of(args, kwargs)
        batch = sample.shape[0]
        progress, timestep = self.clock()
        scale = self.schedule.at(progress, timestep)
        if scale == 0.0:
            return None
        if self._repeats_last_step(args, kwargs, sample):
            self._call = {"repeat": True}
            return None
        cond = _cond_rows(batch, self.cfg_active())
        self._call = {"repeat": False, "scale": scale, "batch": batch, "cond": cond, "args": args, "kwargs": kwargs}
        if self.sequential:
            return None
        perturbed = cond.stop - cond.start
        self.state.activate(range(batch, batch + perturbed), self.head_weights(), self.image_tokens())
        new_args = _with_rows(args, batch, cond, append=True)
        return new_args, _with_rows(kwargs, batch, cond, append=True, top=True)

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
        if self.sequential:
            eps_p = self._perturbed_pass(module, call)
        else:
            eps, eps_p = eps[:batch], eps[batch:]
        shift = call["scale"] * (eps[cond] - eps_p)
        args, kwargs = call["args"], call["kwargs"]
        self._memo = _StepMemo(_timestep_of(args, kwargs), _sample_of(args, kwargs), shift)
        return _replace_sample(output, eps + _tile(shift, batch))

    # ------------------------------------------------------------------------------------- helpers
    def _perturbed_pass(self, module: torch.nn.Module, call: dict[str, Any]) -> torch.Tensor:
        """The conditional rows once more, all of them perturbed (peak memory: the smaller batch)."""
        args = _with_rows(call["args"], call["batch"], call["cond"], append=False)
        kwargs = _with_rows(call["kwargs"], call["batch"], call["cond"], append=False, top=True)
        self.state.activate(range(call["cond"].stop - call["cond"].start), self.head_weights(), self.image_tokens())
        self._nested = True
        try:
            return _sample_out(module(*args, **kwargs))
        finally:
            self._nested = False
            self.state.deactivate()

    def _repeats_last_step(self, args: tuple, kwargs: dict, sample: torch.Tensor) -> bool:
        """Whether this call predicts again at the step just guided: the pipeline hands over the very same
        noisy-input tensor (FLUX's unconditional pass, SD3's skip-layer pass) at the same timestep. Object
        identity, not equal values: a new run with the same seed starts from a new tensor."""
        memo = self._memo
        if memo is None or sample is not memo.sample or sample.shape[0] % memo.shift.shape[0]:
            return False
        timestep = _timestep_of(args, kwargs)
        return timestep.flatten()[:1].tolist() == memo.timestep.flatten()[:1].tolist()


def _tile(shift: torch.Tensor, batch: int) -> torch.Tensor:
    """The per-prompt shift repeated over a batch of [uncond, cond] (or further) groups of prompts."""
    return shift.repeat(batch // shift.shape[0], *[1] * (shift.ndim - 1))


def _cond_rows(batch: int, cfg: bool) -> slice:
    """The conditional rows: the second half of a [uncond, cond] CFG batch, else all of them."""
    if cfg:
        if batch % 2:
            raise RuntimeError(
                f"the pipeline reports classifier-free guidance but the denoiser got an odd batch of "
                f"{batch}; "
                "perturbation guidance expects [uncond, cond] halves"
            )
        return slice(batch // 2, batch)
    return slice(0, batch)


def _with_rows(value: Any, batch: int, rows: slice, append: bool, top: bool = False) -> Any:
    """Every batched tensor in `value` (nested tuples, lists, dicts) with rows appended or selected."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 or value.shape[0] != batch:
            return value
        return torch.cat([value, value[rows]]) if append else value[rows]
    if isinstance(value, dict):
        return {
            key: item if top and key in _UNBATCHED_KWARGS else _with_rows(item, batch, rows, append)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        items = [_with_rows(item, batch, rows, append) for item in value]
        return type(value)(items) if isinstance(value, list) or type(value) is tuple else type(value)(*items)
    return value


def _sample_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The noisy input: the first positional argument or `sample` / `hidden_states`."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for name in _SAMPLE_KWARGS:
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    raise RuntimeError("perturbation guidance found no noisy input (`sample` or `hidden_states`) in the denoiser call")


def _timestep_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The timestep argument as a tensor (second positional argument or `timestep`)."""
    value = kwargs["timestep"] if "timestep" in kwargs else args[1]
    return torch.as_tensor(value)


def _sample_out(output: Any) -> torch.Tensor:
    """The prediction inside a denoiser output (tuple, ModelOutput or tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def _replace_sample(output: Any, sample: torch.Tensor) -> Any:
    """The same kind of output holding `sample`."""
    if isinstance(output, torch.Tensor):
        return sample
    if isinstance(output, tuple):
        return (sample, *output[1:])
    output.sample = sample
    return output
