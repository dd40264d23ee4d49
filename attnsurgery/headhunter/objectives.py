"""Objectives for the head search: ``objective(images, prompts) -> scores`` (higher is better).

``images`` are uint8 arrays ``[height, width, 3]``, one per prompt. Learned objectives load through
transformers from a hub id or a local folder; offline, a hub id fails with a message saying how to point
at a local copy instead.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["Objective", "ClipScore", "AestheticScore", "ReferenceScore", "make_objective", "OBJECTIVES"]

Objective = Callable[[Sequence[np.ndarray], Sequence[str]], Sequence[float]]

CLIP_MODEL = "openai/clip-vit-large-patch14"
#: PickScore (Kirstain et al. 2023) is a fine-tuned CLIP-H scored like CLIP; its processor is CLIP-H's.
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _from_pretrained(loader: Callable[[str], Any], name: str, what: str, flag: str) -> Any:
    """``loader(name)`` with an offline-friendly error."""
    try:
        return loader(name)
    except OSError as error:
        hint = (
            "the folder has no such files"
            if Path(name).exists()
            else (
                f"the hub is unreachable or {name!r} is not a model id; on a machine with internet run "
                f"`huggingface-cli download {name} --local-dir DIR`, copy DIR here and pass it with {flag} DIR"
            )
        )
        raise RuntimeError(f"could not load the {what} from {name!r}: {hint} ({error})") from None


class _ClipObjective:
    """A CLIP model and its processor, loaded offline-friendly, scoring images in batches."""

    def __init__(self, model: str, processor: str | None, device: str | torch.device, batch_size: int) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.model = _from_pretrained(CLIPModel.from_pretrained, model, "CLIP model", "--objective-model")
        self.model = self.model.eval().requires_grad_(False).to(device)
        self.processor = _from_pretrained(
            CLIPProcessor.from_pretrained, processor or model, "CLIP processor", "--objective-processor"
        )
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        scores: list[float] = []
        for begin in range(0, len(images), self.batch_size):
            chunk = slice(begin, begin + self.batch_size)
            scores += self._scores(list(images[chunk]), list(prompts[chunk])).float().tolist()
        return scores

    def _scores(self, images: list[np.ndarray], prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError


class ClipScore(_ClipObjective):
    """CLIP score, ``logit_scale * cos(image, text)`` (PickScore's formula; CLIP's scale is 100).

    Args:
        model: hub id or local folder of a transformers ``CLIPModel``.
        processor: hub id or folder of its ``CLIPProcessor`` (default: ``model``).
        device: where the model runs (default: CPU).
        batch_size: images per forward.

    Example (not run as a test: it needs the CLIP weights downloaded):
        >>> clip = ClipScore("path/to/clip-vit-large-patch14")  # doctest: +SKIP
        >>> scores = clip([image], ["a red circle"])  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str = CLIP_MODEL,
        processor: str | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
    ) -> None:
        super().__init__(model, processor, device, batch_size)

    def _scores(self, images: list[np.ndarray], prompts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
        out = self.model(**inputs.to(self.device))
        cosine = (out.image_embeds * out.text_embeds).sum(-1)  # both are unit vectors
        return self.model.logit_scale.exp() * cosine


class AestheticScore(_ClipObjective):
    """The LAION aesthetic predictor (v2): an MLP on unit-norm CLIP image embeddings.

    The head is the MLP 768-1024-128-64-16-1 of ``sac+logos+ava1-l14-linearMSE.pth`` (keys ``layers.0``,
    ``layers.2``, ``layers.4``, ``layers.6``, ``layers.7``); its input width follows the CLIP model's.

    Args:
        head: path of the head's weights (.pth or .safetensors).
        clip_model: hub id or folder of the CLIP model the head was trained on (ViT-L/14).
        processor: its processor (default: ``clip_model``).
        device: where both run.
        batch_size: images per forward.

    Example (not run as a test: it needs the head's and the CLIP model's weights downloaded):
        >>> aesthetic = AestheticScore(  # doctest: +SKIP
        ...     "sac+logos+ava1-l14-linearMSE.pth", clip_model="path/to/clip-vit-large-patch14")
    """

    def __init__(
        self,
        head: str | os.PathLike,
        clip_model: str = CLIP_MODEL,
        processor: str | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
    ) -> None:
        state = _load_state_dict(Path(head))
        super().__init__(clip_model, processor, device, batch_size)
        self.head = aesthetic_head(self.model.config.projection_dim).to(device)
        self.head.load_state_dict(state)
        self.head.eval().requires_grad_(False)

    def _scores(self, images: list[np.ndarray], prompts: list[str]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        features = self.model.get_image_features(pixel_values=pixels)
        features = features if isinstance(features, torch.Tensor) else features.pooler_output
        return self.head(features / features.norm(dim=-1, keepdim=True)).squeeze(-1)


def aesthetic_head(width: int) -> torch.nn.Sequential:
    """The LAION aesthetic MLP (dropouts sit at the odd indices, so the checkpoint's keys line up)."""
    return torch.nn.Sequential(
        torch.nn.Linear(width, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    )


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(
            f"aesthetic head {str(path)!r} does not exist; download sac+logos+ava1-l14-linearMSE.pth from the "
            "LAION improved-aesthetic-predictor repository and pass its path"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {key.removeprefix("layers."): value for key, value in state.items()}


class ReferenceScore:
    """The reference world's analytic evaluator as a graded objective.

    Per image: the fraction of the prompt's objects found, minus half the spurious objects per object
    asked for, plus a quarter of the fraction of detected objects whose shape is clean. A correct image
    with clean shapes scores 1.25; the grading (instead of fidelity's 0/1) lets a search rank heads on
    few images.
    """

    def __call__(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        from ..reference.evaluator import score

        return [_graded(score(image, prompt)) for image, prompt in zip(images, prompts, strict=True)]


def _graded(sample: Any) -> float:
    expected, detected = sample.expected, sample.detected
    wanted = max(1, sum(expected.values()))
    found = sum((expected & detected).values())
    spurious = sum((detected - expected).values())
    clean = np.mean([d.clean for d in sample.detections]) if sample.detections else 0.0
    return float((found - 0.5 * spurious) / wanted + 0.25 * clean)


def python_objective(spec: str) -> Objective:
    """``module:function`` (or ``module.sub:function``) imported as an objective."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"python objective {spec!r} must look like 'package.module:function'")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import objective {spec!r}: {error}") from None
    if not callable(function):
        raise ValueError(f"objective {spec!r} is not callable")
    return function


OBJECTIVES = ("clip", "pickscore", "aesthetic", "reference", "python:MODULE:FUNCTION")


def make_objective(
    name: str,
    model: str | None = None,
    processor: str | None = None,
    head: str | None = None,
    device: str | torch.device = "cpu",
) -> Objective:
    """An objective by name, as the CLI spells it.

    Args:
        name: one of ``OBJECTIVES``.
        model: the objective model's hub id or folder (clip, pickscore, aesthetic's CLIP).
        processor: its processor, when it lives elsewhere (PickScore uses CLIP-H's).
        head: the aesthetic head's weights file.
        device: where the objective model runs.
    """
    if name == "clip":
        return ClipScore(model or CLIP_MODEL, processor, device)
    if name == "pickscore":
        return ClipScore(model or PICKSCORE_MODEL, processor or (None if model else PICKSCORE_PROCESSOR), device)
    if name == "aesthetic":
        if head is None:
            raise ValueError("objective 'aesthetic' needs the head's weights file (--objective-head FILE)")
        return AestheticScore(head, model or CLIP_MODEL, processor, device)
    if name == "reference":
        return ReferenceScore()
    if name.startswith("python:"):
        return python_objective(name.removeprefix("python:"))
    raise ValueError(f"unknown objective {name!r}; use one of {OBJECTIVES}")
