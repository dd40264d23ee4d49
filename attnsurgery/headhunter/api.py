"""``attnsurgery.hunt``: find the heads whose perturbation guidance serves an objective.

The search is HeadHunter's greedy head selection ("Fine-Grained Perturbation Guidance via Attention Head
Selection", 2025). The search loop lives in `search`, the batched generation in `scoring`; this module
resolves the settings (the paper's presets per family), runs the search and returns a `HeadSet` that
`PerturbedAttention(heads=Path(...))` loads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from ..inventory import ModelInfo, describe
from ..ops.perturb import KINDS
from ..perturbation.headset import SELF_KINDS, Head, HeadSet, head_name, model_fingerprint, parse_head_name
from ..selectors import LayerSelector
from ..surgery import resolve_target
from .objectives import Objective, make_objective
from .scoring import CandidateScorer, GenerationSettings
from .search import Processes, Racing, ScoreStore, greedy_search

__all__ = ["hunt", "HuntPreset", "HuntResult", "preset_for", "report_table", "search_pairs", "Racing"]


@dataclass(frozen=True)
class HuntPreset:
    """Search settings for a family (every one overridable in `hunt`).

    - SD3 / SD3.5: the paper's general-quality search: R = 1 round, k = 24, s = 3.0, 20 steps, u = 0.25
      while searching (the paper recommends u = 1 elsewhere, then lowering u at use), no CFG.
    - FLUX: s = 8.0, 15 steps, 512 px (the paper's FLUX settings), one round of k = 24 as for SD3.
    - U-Nets (no published search): one round of k = 4 at s = 3.0 with CFG 4.0 and u = 1, the PAG
      authors' SD1.5 setting; "the top 6 heads of one layer already match whole-layer PAG".
    """

    rounds: int
    top_k: int
    scale: float
    soft: float
    steps: int
    cfg: float | None
    size: int | None = None


PRESETS = {
    "sd3": HuntPreset(rounds=1, top_k=24, scale=3.0, soft=0.25, steps=20, cfg=1.0),
    "flux": HuntPreset(rounds=1, top_k=24, scale=8.0, soft=1.0, steps=15, cfg=None, size=512),
    "unet": HuntPreset(rounds=1, top_k=4, scale=3.0, soft=1.0, steps=20, cfg=4.0),
}


#: Halve the candidates each time the pairs double, starting from 2 pairs.
DEFAULT_RACING = Racing()


def preset_for(family_name: str, family_kind: str) -> HuntPreset:
    """The preset of a family (SD3.5 shares SD3's)."""
    if family_kind == "unet":
        return PRESETS["unet"]
    return PRESETS["flux" if family_name == "flux" else "sd3"]


@dataclass(frozen=True)
class HuntResult:
    """A finished search: the head set and what it cost.

    Attributes:
        head_set: the selected heads (save with ``head_set.save(path)``).
        denoiser_calls: denoiser forwards this process ran (0 for work read from a checkpoint).
        images: images this process generated.
        seconds: wall-clock time of the search.
        exhaustive_calls: denoiser calls the paper's loop (one candidate per pass, every pair) would need.
        process_index: this process under ``accelerate launch`` (0 alone); the first one saves results.
    """

    head_set: HeadSet
    denoiser_calls: int
    images: int
    seconds: float
    exhaustive_calls: int
    process_index: int = 0


def hunt(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int] = (0,),
    objective: str | Objective = "clip",
    *,
    rounds: int | None = None,
    top_k: int | None = None,
    soft: float | None = None,
    scale: float | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    height: int | None = None,
    width: int | None = None,
    candidates: LayerSelector = "all",
    batch_candidates: int = 8,
    racing: Racing | None = DEFAULT_RACING,
    resume: str | os.PathLike | None = None,
    kind: str = "identity",
    negative_prompt: str | None = None,
    progress: bool = True,
    processes: Processes | None = None,
) -> HuntResult:
    """Greedy search for the attention heads whose perturbation guidance maximises ``objective``.

    Every (prompt, seed) pair is generated with guidance on S + {candidate} for each remaining candidate
    head; the k best heads join S; R rounds. Settings left at None take the family's preset
    (`HuntPreset`). The pipeline is restored when the search ends (also on an error).

    Args:
        pipe: a diffusers text-to-image pipeline (SD1.x/2.x, SDXL, SD3/3.5, FLUX).
        prompts: the search prompts; the pairs are every prompt with every seed, seed-major, so that the
            first pairs racing uses already cover different prompts.
        seeds: the seeds of the pairs.
        objective: "clip", "pickscore", "reference", "python:module:function", or a callable
            ``f(images, prompts) -> scores`` (uint8 [H, W, 3] images; higher is better).
        rounds, top_k: R and k.
        soft: u, the SoftPAG blend of every selected head while searching.
        scale: perturbation guidance scale s.
        steps: denoising steps per image.
        cfg: classifier-free guidance scale (None: preset; 1.0 turns CFG off).
        height, width: image size (None: preset or the pipeline's default).
        candidates: layer selector whose heads are candidates ("all": every self/joint attention layer).
        batch_candidates: images per pipeline call (each row its own head set and pair).
        racing: successive halving over the pairs; None scores every candidate on every pair.
        resume: a JSON checkpoint written after every batch; an existing one is resumed when the settings
            match (an interrupted search then ends exactly as an uninterrupted one).
        kind: the perturbation (see `PerturbedAttention`).
        negative_prompt: for CFG.
        progress: show a progress bar.
        processes: splitting over processes (None: accelerate's, one process unless launched by
            ``accelerate launch``/``torchrun``; move the pipeline to ``accelerate.PartialState().device``
            first, and on CPU-only machines create ``PartialState(cpu=True)`` first). Every process returns
            the same result; only the first writes the checkpoint.

    Returns:
        The head set with per-round scores and the search's cost.

    Example (not run as a test: a search generates hundreds of images, minutes on a CPU):
        >>> result = surg.hunt(  # doctest: +SKIP
        ...     pipe, ["a red circle", "a blue square"], seeds=[0, 1], objective="reference")
        >>> result.head_set.save("heads.json")  # doctest: +SKIP
        PosixPath('heads.json')
        >>> handle = surg.apply(pipe, surg.PerturbedAttention(scale=3.0, heads=Path("heads.json")))  # doctest: +SKIP
    """
    model = _model_of(pipe)
    preset = preset_for(model.family.name, model.family.kind)
    preset = replace(
        preset,
        **{
            k: v
            for k, v in (
                ("rounds", rounds),
                ("top_k", top_k),
                ("soft", soft),
                ("scale", scale),
                ("steps", steps),
                ("cfg", cfg),
            )
            if v is not None
        },
    )
    _check(preset, prompts, seeds, batch_candidates, kind)
    pool = model.select(candidates, kinds=SELF_KINDS)
    heads: list[Head] = [(layer.path, h) for layer in pool for h in range(layer.heads)]
    pairs = search_pairs(prompts, seeds)
    height = height or preset.size
    width = width or preset.size
    generation = GenerationSettings(
        steps=preset.steps,
        scale=preset.scale,
        soft=preset.soft,
        cfg=preset.cfg,
        height=height,
        width=width,
        kind=kind,
        negative_prompt=negative_prompt,
    )
    objective_name = objective if isinstance(objective, str) else _qualified_name(objective)
    score_fn = make_objective(objective) if isinstance(objective, str) else objective
    settings = {
        "objective": objective_name,
        "pairs": pairs,
        "candidates": [head_name(h) for h in heads],
        "rounds": preset.rounds,
        "top_k": preset.top_k,
        "batch_candidates": batch_candidates,
        "racing": None if racing is None else asdict(racing),
        "generation": asdict(generation),
        "model": model_fingerprint(model),
    }
    processes = processes or Processes()
    store = ScoreStore(resume, settings, write=processes.rank == 0)
    start = time.perf_counter()
    with CandidateScorer(pipe, pairs, score_fn, generation, {layer.path: layer.heads for layer in pool}) as scorer:
        rounds_done = greedy_search(
            heads,
            len(pairs),
            scorer.score,
            store,
            preset.rounds,
            preset.top_k,
            batch_candidates,
            racing,
            processes,
            progress,
        )
    selected = tuple(s.head for r in rounds_done for s in r.selected)
    head_set = HeadSet(
        selected, model_fingerprint(model), tuple(rounds_done), {k: v for k, v in settings.items() if k != "model"}
    )
    exhaustive = sum(len(heads) - i * preset.top_k for i in range(len(rounds_done))) * len(pairs) * preset.steps
    return HuntResult(
        head_set, scorer.denoiser_calls, scorer.images, time.perf_counter() - start, exhaustive, processes.rank
    )


def search_pairs(prompts: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int]]:
    """Every prompt with every seed, seed-major, so that the first pairs (racing's) cover many prompts."""
    return [(prompt, int(seed)) for seed in seeds for prompt in prompts]


def _model_of(pipe: Any) -> ModelInfo:
    _, denoiser = resolve_target(pipe)
    return describe(denoiser, getattr(pipe, "vae_scale_factor", None))


def _check(preset: HuntPreset, prompts: Sequence[str], seeds: Sequence[int], batch: int, kind: str) -> None:
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings (one search prompt per item)")
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    for name, value in (
        ("rounds", preset.rounds),
        ("top_k", preset.top_k),
        ("steps", preset.steps),
        ("batch_candidates", batch),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"hunt {name}={value!r} must be a positive integer")
    if not 0.0 < preset.soft <= 1.0:
        raise ValueError(f"hunt soft={preset.soft} must be in (0, 1]")
    if preset.scale <= 0.0:
        raise ValueError(f"hunt scale={preset.scale} must be > 0: the search compares guided images")
    if kind not in KINDS or kind == "temperature":
        raise ValueError(f"hunt kind={kind!r} is not supported; use one of {[k for k in KINDS if k != 'temperature']}")


def _qualified_name(function: Any) -> str:
    return f"python:{getattr(function, '__module__', '?')}:{getattr(function, '__qualname__', type(function).__name__)}"


def report_table(head_set: HeadSet) -> str:
    """A markdown table of the rounds: each selected head, its mean score and the gain over the round's base."""
    lines = ["| round | head | score | gain over base | pairs |", "| ---: | --- | ---: | ---: | ---: |"]
    for result in head_set.rounds:
        lines.append(f"| {result.round} | base (heads of earlier rounds) | {result.base_score:.4f} | | |")
        for s in result.selected:
            lines.append(
                f"| {result.round} | {s.head} | {s.score:.4f} | {s.score - result.base_score:+.4f} | {s.pairs} |"
            )
    return "\n".join(lines)


def head_grid(
    pipe: Any, head_set: HeadSet, pairs: Sequence[tuple[str, int]], top: int = 6, path: str | os.PathLike | None = None
) -> Image.Image:
    """Images of the base (no head perturbed) and each of the first ``top`` selected heads alone (rows)
    for ``pairs`` (columns), generated with the head set's search settings.

    Example (``result`` from :func:`hunt`; not run as a test, as that search is not):
        >>> grid = head_grid(  # doctest: +SKIP
        ...     pipe, result.head_set, [("a red circle", 0), ("a blue square", 1)], path="heads.png")
    """
    generation = GenerationSettings(**head_set.settings["generation"])
    rows: list[tuple[Head, ...]] = [(), *[(parse_head_name(h),) for h in head_set.heads[:top]]]
    layers = {layer.path: layer.heads for layer in _model_of(pipe).layers if layer.kind in SELF_KINDS}
    items = [(heads, p) for heads in rows for p in range(len(pairs))]

    def no_score(images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        return [0.0] * len(images)

    with CandidateScorer(pipe, pairs, no_score, generation, layers) as scorer:
        images = scorer.generate(items)
    h, w = images[0].shape[:2]
    grid = Image.new("RGB", (w * len(pairs), h * len(rows)))
    for i, image in enumerate(images):
        grid.paste(Image.fromarray(image), ((i % len(pairs)) * w, (i // len(pairs)) * h))
    if path is not None:
        grid.save(path)
    return grid
