"""The test ComfyUI itself works: a tiny SD1.5 samples deterministically on CPU."""

from __future__ import annotations

import torch

from .tiny_comfy import sample


def test_tiny_model_samples_deterministically(tiny):
    assert torch.isfinite(tiny.baseline).all()
    assert torch.equal(sample(tiny.model, tiny.positive, tiny.negative), tiny.baseline)
    assert not torch.equal(sample(tiny.model, tiny.negative, tiny.positive), tiny.baseline)
