"""Batched candidate scoring on tiny pipelines: rows with their own head sets equal separate passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnsurgery as surg
from attnsurgery.headhunter.scoring import CandidateScorer, GenerationSettings
from tests.support.pipes import run_pipe

TOP = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
UP = "up_blocks.3.attentions.1.transformer_blocks.0.attn1"
PAIRS = [("a red circle", 0), ("a blue square", 1)]
SETTINGS = GenerationSettings(steps=2, scale=3.0, cfg=4.0, height=64, width=64)


def unit_scores(images, prompts):
    return [float(np.asarray(image, np.float64).mean()) for image in images]


def _layers(pipe):
    return {layer.path: layer.heads for layer in surg.describe(pipe.unet, 8).layers if layer.kind == "self"}


def test_rows_with_own_head_sets_equal_one_candidate_per_pass(sd15):
    items = [((), 0), (((TOP, 0),), 0), (((TOP, 1),), 0), (((TOP, 1), (UP, 2)), 1)]
    with CandidateScorer(sd15, PAIRS, unit_scores, SETTINGS, _layers(sd15)) as scorer:
        batched = scorer.generate(items)
        alone = [scorer.generate([item])[0] for item in items]
    as_float = [image.astype(np.float64) for image in alone]
    # non-trivial: each head set changes the image, and differently
    assert np.abs(as_float[1] - as_float[0]).max() > 20
    assert np.abs(as_float[2] - as_float[1]).max() > 20
    for one, many in zip(alone, batched):
        assert np.abs(one.astype(int) - many.astype(int)).max() <= 1  # uint8 rounding of float noise


def test_the_base_item_is_the_plain_pipeline_and_the_cache_is_its_encoding(sd15):
    expected = run_pipe(sd15, "a blue square", steps=2, size=64, seed=1, guidance_scale=4.0)
    with CandidateScorer(sd15, PAIRS, unit_scores, SETTINGS, _layers(sd15)) as scorer:
        image = scorer.generate([((), 1)])[0]
    assert np.abs(image.astype(int) - (expected[0].numpy() * 255).round().astype(int)).max() <= 1


def test_calls_are_counted_and_the_pipeline_is_restored(sd15):
    processors = dict(sd15.unet.attn_processors)
    before = run_pipe(sd15)
    with CandidateScorer(sd15, PAIRS, unit_scores, SETTINGS, _layers(sd15)) as scorer:
        scores = scorer.score([(((TOP, 0),), 0), (((TOP, 1),), 1)])
    assert scorer.denoiser_calls == SETTINGS.steps and scorer.images == 2 and len(scores) == 2
    assert dict(sd15.unet.attn_processors) == processors
    assert not surg.active_surgeries(sd15)
    assert torch.equal(run_pipe(sd15), before)


def test_an_objective_with_the_wrong_number_of_scores_fails(sd15):
    with CandidateScorer(sd15, PAIRS, lambda images, prompts: [1.0], SETTINGS, _layers(sd15)) as scorer:
        with pytest.raises(RuntimeError, match="returned 1 scores for 2 images"):
            scorer.score([((), 0), ((), 1)])
    assert not surg.active_surgeries(sd15)


def test_sd3_rows_with_own_head_sets(sd3):
    layers = {layer.path: layer.heads for layer in surg.describe(sd3.transformer).layers if layer.kind == "joint"}
    block = "transformer_blocks.1.attn"
    settings = GenerationSettings(steps=2, scale=3.0, cfg=1.0, height=64, width=64)
    items = [(((block, 0),), 0), (((block, 1),), 0)]
    with CandidateScorer(sd3, PAIRS, unit_scores, settings, layers) as scorer:
        batched = scorer.generate(items)
        alone = [scorer.generate([item])[0] for item in items]
    assert np.abs(alone[0].astype(int) - alone[1].astype(int)).max() > 5
    for one, many in zip(alone, batched):
        assert np.abs(one.astype(int) - many.astype(int)).max() <= 1
