"""PerturbedAttention: perturbation guidance (PAG, SoftPAG, uniform, mean-query, temperature) at head level.

The plugin is a validated config over the perturbation engine (`attnsurgery.perturbation`): it wraps the
chosen layers' own processors (the perturbation is a per-(row, head) lerp of their attention output, see
`attnsurgery.ops.perturb`) and puts the guidance wrapper on the denoiser (`attnsurgery.perturbation.guidance`),
which adds the perturbed rows and folds their prediction into the pipeline's own classifier-free guidance.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from ..ops.perturb import KINDS
from ..perturbation.guidance import GuidanceSchedule, PerturbationGuidance, check_cache, check_guided_pipeline
from ..perturbation.headset import SELF_KINDS, HeadSet
from ..perturbation.processor import HeadPerturbationProcessor, PerturbationState, check_reaches_sdpa
from .base import Plugin, check_number, normalize_layers

if TYPE_CHECKING:
    from ..inventory import ModelInfo
    from ..surgery import Surgery

__all__ = ["PerturbedAttention", "default_layers", "install_perturbation"]

MODES = ("batched", "sequential")
JOINT = ("full", "image_only")
TEXT_KINDS = ("joint", "single")  # layers whose sequence holds text tokens besides the image's

_check_number = partial(check_number, "PerturbedAttention")


def default_layers(model: ModelInfo) -> str:
    """The family's default layers.

    - U-Nets: the mid block's self-attention (the PAG authors' choice for SD1.5, diffusers' "mid").
    - SD3 / SD3.5: block 1 exactly (``transformer_blocks.1``; diffusers' regex "blocks.1" also hits
      blocks 10-19). On SD3.5 with dual attention in block 1 this includes its image-only ``attn2``.
    - FLUX, FLUX.2, Chroma, Qwen-Image: the second double-stream block, ``transformer_blocks.1``: no
      published whole-layer preset exists (diffusers' PAG guider raises on FLUX), so we follow SD3's default,
      an early joint block.
    - Z-Image: for the same reason its second joint layer, ``layers.1`` (its refiners see one stream only).
    """
    if model.family.kind == "unet":
        return "mid"
    return "layers.1" if model.family.name == "zimage" else "transformer_blocks.1"


@dataclass(frozen=True)
class PerturbedAttention(Plugin):
    """Perturbation guidance on whole layers or single heads.

    eps = eps_u + w (eps_c - eps_u) + s_t (eps_c - eps_p) with CFG, eps_c + s_t (eps_c - eps_p) without,
    where eps_p is the conditional prediction with the chosen heads' attention perturbed.

    Args:
        scale: s, the guidance scale (the PAG authors: 3.0 with CFG 4.0, 5.0 without CFG). 0 disables it.
        layers: layer selector (path, enclosing path, glob or group); every head of those layers.
            None with heads=None: the family default (see `default_layers`).
        heads: head spec: "path:head" strings and (block_index, head) tuples, or a list of them; or the
            `Path` of a head-set JSON written by `attnsurgery.hunt` (checked against the model).
        soft: u, the SoftPAG blend toward the perturbed map (1 = full PAG, 0 = nothing).
        kind: "identity" (PAG), "uniform", "mean_query" (SEG with infinite blur) or "temperature".
        temperature: tau for kind="temperature" (tau > 1 flattens the map).
        adaptive_scale: a in s_t = max(0, s - a (1000 - t)), diffusers' adaptive PAG scale.
        start: progress in [0, 1] from which the guidance runs (0 = first step).
        stop: progress up to which it runs; the default window 0..1 is every step, as diffusers' PAG
            pipelines (its modular guider runs only 0.01..0.2).
        mode: "batched" (one forward with [uncond, cond, perturbed] rows: fastest) or "sequential" (one
            extra forward for the perturbed rows: peak memory of plain CFG).
        joint: on MMDiTs, "full" perturbs the whole joint image+text sequence (HeadHunter's semantics);
            "image_only" keeps the text keys and puts the identity on the image-image block only
            (diffusers' StableDiffusion3PAGPipeline; kind="identity" only).

    Example:
        >>> import attnsurgery as surg
        >>> handle = surg.apply(pipe, surg.PerturbedAttention(scale=3.0, heads=["transformer_blocks.11:15"]))
        >>> image = pipe("a castle at dusk", guidance_scale=4.0).images[0]
        >>> handle.remove()
    """

    scale: float = 3.0
    layers: str | tuple[str, ...] | None = None
    heads: str | tuple[Any, ...] | os.PathLike | None = None
    soft: float = 1.0
    kind: str = "identity"
    temperature: float | None = None
    adaptive_scale: float = 0.0
    start: float = 0.0
    stop: float = 1.0
    mode: str = "batched"
    joint: str = "full"

    def __post_init__(self) -> None:
        if self.layers is not None:
            normalize_layers(self, self.layers)
        if isinstance(self.heads, list):  # from_dict gives lists; (block, head) pairs become tuples again
            heads = tuple(tuple(h) if isinstance(h, list) else h for h in self.heads)
            object.__setattr__(self, "heads", heads)
        _check_heads(self.heads)
        _check_number("scale", self.scale, 0.0, math.inf, "a guidance scale >= 0 such as 3.0")
        _check_number("soft", self.soft, 0.0, 1.0, "a blend weight in [0, 1] (1 = full PAG)")
        _check_number("adaptive_scale", self.adaptive_scale, 0.0, math.inf, "0 (off) or a rate like 0.01")
        _check_number("start", self.start, 0.0, 1.0, "a progress in [0, 1]")
        _check_number("stop", self.stop, self.start, 1.0, f"a progress in [start={self.start}, 1]")
        _check_choice("kind", self.kind, KINDS)
        _check_choice("mode", self.mode, MODES)
        _check_choice("joint", self.joint, JOINT)
        if self.kind == "temperature":
            if self.temperature is None or not self.temperature > 0:
                raise ValueError(f"kind='temperature' needs temperature > 0 (e.g. 2), got {self.temperature}")
        elif self.temperature is not None:
            raise ValueError(f"temperature={self.temperature!r} only applies to kind='temperature', not {self.kind!r}")
        if self.joint == "image_only" and self.kind != "identity":
            raise ValueError(
                f"joint='image_only' is diffusers' identity variant; use kind='identity', not {self.kind!r}"
            )
        if self.layers is not None and self.heads is not None:
            raise ValueError("give layers= (every head of those layers) or heads= (single heads), not both")

    # ---------------------------------------------------------------------------------------------
    def head_weights(self, model: ModelInfo) -> dict[str, torch.Tensor]:
        """Layer path -> [1, heads] weights: `soft` on the selected heads, 0 elsewhere.

        Raises:
            ValueError: the selection matches no self/joint attention layer or names a head out of range.
        """
        heads = self.heads
        if isinstance(heads, os.PathLike):
            heads = HeadSet.load(heads).heads_for(model)
        if heads is not None:
            selected = model.select_heads(heads, kinds=SELF_KINDS)
        else:
            layers = self.layers if self.layers is not None else default_layers(model)
            selected = {layer.path: None for layer in model.select(layers, kinds=SELF_KINDS)}
        weights = {}
        for path, heads in selected.items():
            row = torch.zeros(1, model.layer(path).heads)
            row[0, sorted(heads) if heads is not None else slice(None)] = self.soft
            weights[path] = row
        return weights

    def attach(self, surgery: Surgery) -> None:
        """Wrap the selected layers' processors and put the guidance hooks on the denoiser."""
        weights = self.head_weights(surgery.model)
        if self.joint == "image_only" and not any(surgery.model.layer(p).kind in TEXT_KINDS for p in weights):
            raise ValueError(
                "PerturbedAttention(joint='image_only') keeps the text keys of joint attention, but no selected "
                f"layer sees text tokens (the {surgery.model.family.name} layers chosen are image-only "
                "self-attention): drop joint='image_only', it would change nothing there"
            )
        if self.scale == 0.0 or self.soft == 0.0:
            return  # nothing to add: the pipeline stays bit-identical
        install_perturbation(
            surgery,
            list(weights),
            lambda: weights,
            GuidanceSchedule(self.scale, self.adaptive_scale, self.start, self.stop),
            kind=self.kind,
            temperature=self.temperature,
            joint=self.joint,
            sequential=self.mode == "sequential",
        )


def install_perturbation(
    surgery: Surgery,
    paths: list[str],
    head_weights: Callable[[], Mapping[str, torch.Tensor]],
    schedule: GuidanceSchedule,
    kind: str = "identity",
    temperature: float | None = None,
    joint: str = "full",
    sequential: bool = False,
) -> PerturbationState:
    """Wrap the processors of ``paths`` and put the guidance hooks on the denoiser.

    Shared by `PerturbedAttention` (one fixed head set) and the head search (a table per call, one row
    per candidate head set).

    Args:
        surgery: the surgery recording the changes.
        paths: the layers whose heads may be perturbed.
        head_weights: returns layer path -> [rows, heads] weights for the current call.
        schedule: s_t over the run.
        kind, temperature, joint, sequential: as in `PerturbedAttention`.
    """
    check_guided_pipeline(surgery.pipeline, surgery.model.family.cfg_layout)
    check_cache(surgery.denoiser)
    state = PerturbationState(kind=kind, temperature=temperature, image_only=joint == "image_only")
    for path in paths:
        layer = surgery.model.layer(path)
        check_reaches_sdpa(layer.module.processor, path)
        text_first = layer.text_placement == "first"
        processor = HeadPerturbationProcessor(layer.module.processor, path, state, text_first=text_first)
        surgery.set_processor(layer, processor, role="heads")
    surgery.claim("<denoiser>", "guidance")
    guidance = PerturbationGuidance(
        state=state,
        head_weights=head_weights,
        schedule=schedule,
        sequential=sequential,
        clock=lambda: _clock(surgery),
        cfg_active=lambda: _pipeline_runs_cfg(surgery.pipeline, _clock(surgery)[1]),
        image_tokens=lambda: _image_tokens(surgery) if joint == "image_only" else None,  # full: any image stream
        cfg_layout=surgery.model.family.cfg_layout,
    )
    surgery.add_hook(surgery.denoiser, guidance.pre_hook, pre=True, with_kwargs=True)
    surgery.add_hook(surgery.denoiser, guidance.post_hook, pre=False, with_kwargs=True)
    return state


def _clock(surgery: Surgery) -> tuple[float, float]:
    """(progress, timestep on the 0-1000 scale) of the current call, whatever the pipeline passes as timestep."""
    context = surgery.context
    if context.timestep is None:
        return context.progress, 1000.0 * (1.0 - context.progress)
    return context.progress, surgery.model.family.scheduler_timestep(context.timestep)


def _pipeline_runs_cfg(pipeline: Any, timestep: float) -> bool:
    """Whether the pipeline batches CFG rows now: its own property, read at call time. ZImagePipeline keeps the
    property true but drops CFG at the steps where (1000 - t) / 1000 exceeds its `cfg_truncation`; that rule is
    its own (pipeline_z_image.py), read from the same attribute it reads."""
    try:
        cfg = bool(getattr(pipeline, "do_classifier_free_guidance", False))
    except AttributeError:  # a property reading state that this pipeline never set
        return False
    cut = getattr(pipeline, "_cfg_truncation", None)
    return cfg and not (cut is not None and float(cut) <= 1 and (1000.0 - timestep) / 1000.0 > float(cut))


def _image_tokens(surgery: Surgery) -> int | None:
    """Image tokens of a joint sequence in the current call (MMDiTs), None on U-Nets."""
    if surgery.model.family.kind == "unet" or surgery.context.latent_hw is None:
        return None
    rows, cols = surgery.context.image_grid()
    return rows * cols


def _is_block_head(item: Any) -> bool:
    """A (block_index, head) pair of plain ints (True would pass as block 1)."""
    return isinstance(item, tuple) and len(item) == 2 and all(type(v) is int for v in item)


def _check_heads(heads: Any) -> None:
    """Refuse head specs that would only fail (or silently mean something else) at apply."""
    if heads is None or isinstance(heads, os.PathLike):
        return
    if isinstance(heads, str):
        if heads.endswith(".json"):  # as a string it is read as a layer path and matches nothing
            raise ValueError(
                f"PerturbedAttention heads={heads!r} names a file: pass it as a Path, heads=Path({heads!r}) "
                "(from pathlib), to load a head set written by `attnsurgery hunt`"
            )
        return
    hint = "'path:head' strings, (block_index, head) pairs of ints, a list of them, or the Path of a head-set file"
    if not isinstance(heads, tuple) or not heads:
        raise ValueError(f"PerturbedAttention heads={heads!r} is invalid; use {hint}")
    for item in [heads] if _is_block_head(heads) else heads:
        if not (isinstance(item, str) or _is_block_head(item)):
            raise ValueError(f"PerturbedAttention heads item {item!r} is invalid; use {hint}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"PerturbedAttention {name}={value!r} is invalid; use one of {choices}")
