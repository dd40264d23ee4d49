"""Score many candidate head sets per denoiser call.

Each batch row carries its own (prompt, seed) pair and its own head set: the perturbation is a per-(row,
head) lerp of the attention output, so rows with different head sets in one call give the images that
separate calls would (up to the float rounding of a different batch size). The text encodings come from
a cache, and the pipeline, its processors and hooks are restored when the scorer closes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..perturbation.guidance import GuidanceSchedule
from ..perturbation.headset import Head
from ..plugins.base import Plugin
from ..plugins.perturbation import install_perturbation
from ..surgery import apply
from .objectives import Objective
from .prompts import PromptCache

if TYPE_CHECKING:
    from ..surgery import Surgery

__all__ = ["CandidateScorer", "GenerationSettings"]


@dataclass(frozen=True)
class GenerationSettings:
    """How every image of a search is generated.

    Args:
        steps: denoising steps.
        scale: perturbation guidance scale s.
        soft: SoftPAG blend u on every selected head.
        cfg: classifier-free guidance scale passed to the pipeline (None: the pipeline's default).
        height, width: image size (None: the pipeline's default).
        kind: the perturbation ("identity" = PAG).
        negative_prompt: for CFG.
    """

    steps: int
    scale: float
    soft: float = 1.0
    cfg: float | None = None
    height: int | None = None
    width: int | None = None
    kind: str = "identity"
    negative_prompt: str | None = None


@dataclass(frozen=True)
class _PerRowHeads(Plugin):
    """Perturbation guidance whose head weights the scorer sets per call (internal to the search)."""

    paths: tuple[str, ...] = ()
    weights: Callable[[], Mapping[str, torch.Tensor]] | None = None
    scale: float = 0.0
    kind: str = "identity"
    count_call: Callable[..., None] | None = None

    def attach(self, surgery: Surgery) -> None:
        install_perturbation(surgery, list(self.paths), self.weights, GuidanceSchedule(self.scale), kind=self.kind)
        surgery.add_hook(surgery.denoiser, self.count_call, pre=True)


class CandidateScorer:
    """Generates and scores (head set, pair) items, many per pipeline call.

    Use as a context manager: entering patches the pipeline, leaving restores it exactly.

    Args:
        pipe: a diffusers text-to-image pipeline.
        pairs: the (prompt, seed) pairs items refer to by index.
        objective: ``objective(images, prompts) -> scores``.
        settings: how images are generated.
        layers: every layer path a head set may name, with its head count.
    """

    def __init__(
        self,
        pipe: Any,
        pairs: Sequence[tuple[str, int]],
        objective: Objective,
        settings: GenerationSettings,
        layers: Mapping[str, int],
    ) -> None:
        self.pipe = pipe
        self.pairs = list(pairs)
        self.objective = objective
        self.settings = settings
        self.layers = dict(layers)
        self.denoiser_calls = 0
        self.images = 0
        self._table: dict[str, torch.Tensor] = {}
        self._cache = PromptCache(pipe, cfg=(settings.cfg or 0.0) > 1.0, negative_prompt=settings.negative_prompt)
        self._surgery: Surgery | None = None
        self._progress_config: Any = None

    def __enter__(self) -> CandidateScorer:
        plugin = _PerRowHeads(
            paths=tuple(self.layers),
            weights=lambda: self._table,
            scale=self.settings.scale,
            kind=self.settings.kind,
            count_call=self._count,
        )
        self._surgery = apply(self.pipe, plugin)
        self._progress_config = getattr(self.pipe, "_progress_bar_config", None)
        self.pipe.set_progress_bar_config(disable=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress_config is None:
            vars(self.pipe).pop("_progress_bar_config", None)
        else:
            self.pipe._progress_bar_config = self._progress_config
        if self._surgery is not None:
            self._surgery.remove()
            self._surgery = None

    def _count(self, module: torch.nn.Module, args: tuple) -> None:
        self.denoiser_calls += 1

    def generate(self, items: Sequence[tuple[Sequence[Head], int]]) -> list[np.ndarray]:
        """One pipeline call: row i uses the heads and the pair of ``items[i]``; uint8 images."""
        if self._surgery is None:
            raise RuntimeError("use the scorer inside `with CandidateScorer(...) as scorer:`")
        self._table = self._head_table([heads for heads, _ in items])
        pairs = [self.pairs[index] for _, index in items]
        s = self.settings
        call: dict[str, Any] = {
            "num_inference_steps": s.steps,
            "output_type": "np",
            "generator": [torch.Generator().manual_seed(seed) for _, seed in pairs],
        }
        call.update(
            {k: v for k, v in (("guidance_scale", s.cfg), ("height", s.height), ("width", s.width)) if v is not None}
        )
        try:
            images = self.pipe(**self._cache.batch([prompt for prompt, _ in pairs]), **call).images
        finally:
            self._table = {}
        self.images += len(items)
        return [(np.asarray(image) * 255).round().clip(0, 255).astype(np.uint8) for image in images]

    def score(self, items: Sequence[tuple[Sequence[Head], int]]) -> list[float]:
        """The objective's score of every item, from one pipeline call."""
        images = self.generate(items)
        scores = [float(v) for v in self.objective(images, [self.pairs[index][0] for _, index in items])]
        if len(scores) != len(items):
            raise RuntimeError(f"the objective returned {len(scores)} scores for {len(items)} images")
        return scores

    def _head_table(self, head_sets: Sequence[Sequence[Head]]) -> dict[str, torch.Tensor]:
        """Layer path -> [rows, heads]: u on row i's heads (layers no row perturbs are left out)."""
        table: dict[str, torch.Tensor] = {}
        for row, heads in enumerate(head_sets):
            for path, head in heads:
                if path not in table:
                    table[path] = torch.zeros(len(head_sets), self.layers[path])
                table[path][row, head] = self.settings.soft
        return table
