"""The token-merging node in the real ComfyUI: effect, untouched input model, no-op ratio, seeds, errors."""

from __future__ import annotations

import pytest
import torch

from attnsurgery.comfy.token_merging import AttnSurgeryTokenMerging
from tests.support.comfy.tiny_comfy import sample


def _patch(model, ratio=0.5, sx=2, sy=2, layers="top", seed=0):
    return AttnSurgeryTokenMerging().patch(model, ratio, sx, sy, layers, seed)[0]


def _run(tiny, model):
    return sample(model, tiny.positive, tiny.negative)


def test_merging_changes_the_sample_and_leaves_the_input_model_alone(tiny):
    merged = _run(tiny, _patch(tiny.model))
    assert torch.isfinite(merged).all()
    assert (merged - tiny.baseline).abs().max() > 1e-3
    assert torch.equal(_run(tiny, tiny.model), tiny.baseline)
    assert "patches" not in tiny.model.model_options["transformer_options"]


def test_zero_ratio_is_bit_identical(tiny):
    assert torch.equal(_run(tiny, _patch(tiny.model, ratio=0.0)), tiny.baseline)


def test_seed_and_ratio_drive_the_result(tiny):
    first = _run(tiny, _patch(tiny.model, seed=1))
    assert torch.equal(_run(tiny, _patch(tiny.model, seed=1)), first)
    assert (_run(tiny, _patch(tiny.model, seed=2)) - first).abs().max() > 1e-4
    assert (_run(tiny, _patch(tiny.model, seed=1, ratio=0.25)) - first).abs().max() > 1e-4
    assert (_run(tiny, _patch(tiny.model, seed=1, layers="up_blocks.3")) - first).abs().max() > 1e-4


def test_bad_input_names_the_problem(tiny):
    with pytest.raises(ValueError, match="ratio"):
        _patch(tiny.model, ratio=1.0)
    with pytest.raises(ValueError, match="matches no self-attention layer"):
        _patch(tiny.model, layers="down_blocks.9")
