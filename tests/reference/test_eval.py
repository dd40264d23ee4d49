"""Held-out evaluation: pairs disjoint from training, metrics that move with what is generated."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from attnsurgery.reference.eval import evaluate, heldout_pairs, pipeline_sampler
from attnsurgery.reference.model import build_reference_pipeline
from attnsurgery.reference.shapes import HELDOUT_SEED_BASE, ShapeObject, make_scene, parse_caption, render
from attnsurgery.reference.train import SceneStream


def test_heldout_pairs_are_deterministic_and_outside_training_seeds() -> None:
    pairs = heldout_pairs(30, num_objects=2)
    assert pairs == heldout_pairs(30, num_objects=2)
    assert all(seed >= HELDOUT_SEED_BASE for _, seed in pairs)
    assert all(sum(parse_caption(prompt).values()) == 2 for prompt, _ in pairs)
    assert set(heldout_pairs(5, start=5)) == set(heldout_pairs(10)[5:])
    stream = SceneStream(seed=0)
    drawn = stream.rng.integers(0, HELDOUT_SEED_BASE, size=1000)  # the draw SceneStream.batch makes
    assert drawn.max() < HELDOUT_SEED_BASE
    with pytest.raises(ValueError, match="count"):
        heldout_pairs(0)


def _oracle(num_objects: int, extra: bool = False):
    """Draws exactly the held-out scene (optionally with one surplus object in a corner)."""

    def generate(prompts: list[str], seeds: list[int], size: int) -> Sequence[np.ndarray]:
        images = []
        for seed in seeds:
            scene = make_scene(seed, num_objects)
            if extra:
                colour = scene.objects[0].colour
                corner = ShapeObject(colour, "square", 0.93, 0.93, 0.1)
                scene = type(scene)(scene.seed, scene.background, (*scene.objects, corner), scene.caption)
            images.append(render(scene, size))
        return images

    return generate


def test_perfect_generator_scores_perfectly_and_a_duplicating_one_does_not() -> None:
    pairs = heldout_pairs(12, num_objects=1)
    perfect = evaluate(_oracle(1), pairs, size=64, batch_size=5, progress=False)
    assert perfect.metrics.fidelity == 1.0 and perfect.metrics.duplication_rate == 0.0
    assert len(perfect.scores) == 12 and perfect.size == 64 and perfect.seconds_per_image > 0
    duplicating = evaluate(_oracle(1, extra=True), pairs, size=128, progress=False)
    assert duplicating.metrics.fidelity == 0.0
    assert duplicating.metrics.duplication_rate == 1.0
    assert duplicating.metrics.mean_extra_objects == 1.0


def test_evaluate_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one"):
        evaluate(_oracle(1), [], size=64)
    with pytest.raises(RuntimeError, match="returned 0 images"):
        evaluate(lambda p, s, n: [], heldout_pairs(2), size=64, progress=False)


def test_pipeline_sampler_seeds_each_image_by_its_pair() -> None:
    torch.manual_seed(0)
    pipe = build_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    generate = pipeline_sampler(pipe, num_inference_steps=1, guidance_scale=2.0)
    first = generate(["a red circle", "a blue square"], [1, 2], 64)
    again = generate(["a blue square"], [2], 64)
    assert len(first) == 2 and first[0].shape == (64, 64, 3)
    # Same pair, same image, whatever batch it was in (up to batched-matmul rounding).
    np.testing.assert_allclose(first[1], again[0], atol=1e-4)
    assert np.abs(first[0] - first[1]).max() > 0.01
