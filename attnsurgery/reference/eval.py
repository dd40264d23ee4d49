"""Sample held-out (prompt, seed) pairs with any image generator and score them with the evaluator.

The generator is a plain callable ``generate(prompts, seeds, size) -> images``, so a pipeline with or
without plugins, or anything else that makes pictures, is measured the same way. ``pipeline_sampler``
builds one from a diffusers pipeline.

Example (the evaluation itself, 200 images, is not run as a test):
    >>> from attnsurgery.reference.model import load_reference_pipeline
    >>> pipe = load_reference_pipeline()
    >>> pairs = heldout_pairs(200, num_objects=1)
    >>> report = evaluate(pipeline_sampler(pipe), pairs, size=64)  # doctest: +SKIP
    >>> report.metrics.fidelity  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from attnsurgery.reference.evaluator import Metrics, SampleScore, as_rgb_array, score, summarize
from attnsurgery.reference.shapes import heldout_seed, make_scene

#: ``generate(prompts, seeds, size)`` -> one image per prompt (PIL, HWC array or CHW tensor in [0, 1]).
Generate = Callable[[list[str], list[int], int], Sequence[Image.Image | np.ndarray | torch.Tensor]]


@dataclass(frozen=True)
class EvalReport:
    """Metrics of one evaluation run plus its cost and the per-sample verdicts."""

    metrics: Metrics
    size: int
    seconds_per_image: float
    scores: tuple[SampleScore, ...]
    images: tuple[np.ndarray, ...] = ()  # [H, W, 3] uint8, in pair order, when evaluate(keep_images=True)

    def as_dict(self) -> dict[str, float | int]:
        return {**self.metrics.as_dict(), "size": self.size, "seconds_per_image": self.seconds_per_image}


def heldout_pairs(count: int, num_objects: int | None = None, start: int = 0) -> list[tuple[str, int]]:
    """``count`` held-out (prompt, seed) pairs; their seeds are disjoint from every training seed.

    Args:
        count: number of pairs.
        num_objects: 1, 2 or 3 objects per prompt; None mixes them as the seeds draw.
        start: index of the first pair (use disjoint ranges for disjoint sets).

    Example:
        >>> heldout_pairs(2, num_objects=1)
        [('a red triangle', 1099511627776), ('a yellow square at the top', 1099511627777)]
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    seeds = [heldout_seed(start + i) for i in range(count)]
    return [(make_scene(s, num_objects).caption, s) for s in seeds]


def pipeline_sampler(
    pipe: Callable[..., object],
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    **call_kwargs: object,
) -> Generate:
    """A ``Generate`` callable from a diffusers text-to-image pipeline (each image seeded by its pair).

    Args:
        pipe: a diffusers pipeline (``StableDiffusionPipeline`` or any with the same call signature).
        num_inference_steps: denoising steps per image.
        guidance_scale: classifier-free guidance scale (1.0 disables CFG).
        **call_kwargs: passed on to every pipeline call (e.g. ``negative_prompt``).

    Example:
        >>> from attnsurgery.reference.model import load_reference_pipeline
        >>> generate = pipeline_sampler(load_reference_pipeline(), num_inference_steps=20)
        >>> images = generate(["a red circle"], [0], 64)
    """

    def generate(prompts: list[str], seeds: list[int], size: int) -> Sequence[np.ndarray]:
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        output = pipe(
            prompts,
            height=size,
            width=size,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="np",
            **call_kwargs,
        )
        return list(output.images)  # type: ignore[attr-defined]

    return generate


def evaluate(
    generate: Generate,
    pairs: Sequence[tuple[str, int]],
    size: int = 64,
    batch_size: int = 16,
    progress: bool = True,
    keep_images: bool = False,
) -> EvalReport:
    """Generate every pair at ``size`` px and score it: fidelity, duplication, clean shapes, seconds/image.

    Args:
        generate: ``generate(prompts, seeds, size) -> images``; see ``pipeline_sampler``.
        pairs: (prompt, seed) pairs, e.g. ``heldout_pairs(200, num_objects=1)``.
        size: image side in pixels (the reference model's native size is 64).
        batch_size: pairs per ``generate`` call.
        progress: show a progress bar.
        keep_images: return the images as uint8 arrays in ``report.images`` (for closeness measures).

    Example:
        >>> report = evaluate(pipeline_sampler(pipe), heldout_pairs(50), size=128)  # doctest: +SKIP
    """
    if not pairs:
        raise ValueError("evaluate needs at least one (prompt, seed) pair; see heldout_pairs()")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    scores: list[SampleScore] = []
    kept: list[np.ndarray] = []
    seconds = 0.0
    with tqdm(total=len(pairs), desc=f"eval {size}px", disable=not progress, dynamic_ncols=True) as bar:
        for begin in range(0, len(pairs), batch_size):
            chunk = pairs[begin : begin + batch_size]
            prompts, seeds = [p for p, _ in chunk], [s for _, s in chunk]
            start = time.perf_counter()
            images = generate(prompts, seeds, size)
            seconds += time.perf_counter() - start
            if len(images) != len(chunk):
                raise RuntimeError(f"generate returned {len(images)} images for {len(chunk)} prompts")
            scores += [score(image, prompt) for image, prompt in zip(images, prompts, strict=True)]
            if keep_images:
                kept += [as_rgb_array(image).round().astype(np.uint8) for image in images]
            bar.update(len(chunk))
            bar.set_postfix(fidelity=f"{np.mean([s.correct for s in scores]):.3f}")
    return EvalReport(summarize(scores), size, seconds / len(pairs), tuple(scores), tuple(kept))


#: The model card's evaluation: (label, objects per prompt, image size, pairs). The gate is the first row.
CARD_SUITE: tuple[tuple[str, int | None, int, int], ...] = (
    ("one object", 1, 64, 200),
    ("two objects", 2, 64, 100),
    ("three objects", 3, 64, 100),
    ("mixed, 2x", None, 128, 40),
    ("mixed, 4x", None, 256, 12),
)


TABLE_HEADER = (
    "| prompts | size | pairs | fidelity | duplication rate | mean extra objects | clean shapes | s/image |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
)


def evaluation_rows(
    generate: Generate,
    counts: Sequence[int] | None = None,
    batch_size: int = 16,
) -> dict[str, str]:
    """Run the model card's suite (``CARD_SUITE``) and return its markdown table rows by label.

    Each row draws its own held-out seeds (row ``i`` starts at pair ``i * 100000``), so skipping or
    resizing one row leaves the others' prompts unchanged.

    Args:
        generate: the sampler under test, e.g. ``pipeline_sampler(load_reference_pipeline())``.
        counts: pairs per row, in ``CARD_SUITE`` order; 0 skips a row; None uses the suite's counts.
        batch_size: pairs per ``generate`` call.

    Example:
        >>> rows = evaluation_rows(pipeline_sampler(pipe), counts=[50, 0, 0, 0, 0])  # doctest: +SKIP
    """
    counts = [row[3] for row in CARD_SUITE] if counts is None else list(counts)
    if len(counts) != len(CARD_SUITE):
        raise ValueError(f"counts needs one number per suite row {[r[0] for r in CARD_SUITE]}, got {counts}")
    rows = {}
    for index, ((label, num_objects, size, _), count) in enumerate(zip(CARD_SUITE, counts, strict=True)):
        if count <= 0:
            continue
        pairs = heldout_pairs(count, num_objects, start=index * 100_000)
        report = evaluate(generate, pairs, size, batch_size)
        m = report.metrics
        rows[label] = (
            f"| {label} | {size} | {m.samples} | {m.fidelity:.3f} | {m.duplication_rate:.3f} | "
            f"{m.mean_extra_objects:.3f} | {m.clean_shape_rate:.3f} | {report.seconds_per_image:.2f} |"
        )
    return rows
