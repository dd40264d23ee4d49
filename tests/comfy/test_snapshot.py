"""The test ComfyUI itself works: a tiny SD1.5 samples deterministically on CPU."""

from __future__ import annotations

import importlib.util

import torch

from tests.support.comfy.tiny_comfy import sample


def test_tiny_model_samples_deterministically(tiny):
    assert torch.isfinite(tiny.baseline).all()
    assert torch.equal(sample(tiny.model, tiny.positive, tiny.negative), tiny.baseline)
    assert not torch.equal(sample(tiny.model, tiny.negative, tiny.positive), tiny.baseline)


def test_bootstrap_leaves_no_torchvision_stub_behind(comfyui):
    import comfy.ldm.cascade.stage_c_coder as cascade_coder  # imported at bootstrap; holds torchvision

    assert cascade_coder.torchvision is not None
    importlib.util.find_spec("torchvision")  # a spec-less stub left in sys.modules makes this raise
