"""The window-attention (MSW-MSA) node in the real ComfyUI: effect, untouched input, native no-op, parity."""

from __future__ import annotations

import pytest
import torch

from attnsurgery.comfy.window_attention import AttnSurgeryWindowAttention
from attnsurgery.plugins.hidiffusion import HiDiffusion
from tests.support.comfy.parity import capture_first_call, diffusers_prediction
from tests.support.comfy.tiny_comfy import sample


def _patch(model, layers="top", shift="random", seed=0, force=True):
    return AttnSurgeryWindowAttention().patch(model, layers, shift, seed, force)[0]


def _run(tiny, model):
    return sample(model, tiny.positive, tiny.negative)


def test_windows_change_the_sample_and_leave_the_input_model_alone(tiny):
    windows = _run(tiny, _patch(tiny.model))
    assert torch.isfinite(windows).all() and (windows - tiny.baseline).abs().max() > 1e-3
    assert torch.equal(_run(tiny, tiny.model), tiny.baseline)
    assert torch.equal(_run(tiny, _patch(tiny.model)), windows)  # seeded shifts: reproducible
    assert (_run(tiny, _patch(tiny.model, shift="0")) - _run(tiny, _patch(tiny.model, shift="2"))).abs().max() > 1e-4


def test_native_size_is_bit_identical_unless_forced(tiny):
    assert torch.equal(_run(tiny, _patch(tiny.model, force=False)), tiny.baseline)  # 128 px < 512 px


@pytest.mark.parametrize("shift", ["0", "1"])
def test_windows_match_the_diffusers_plugin(tiny, shift):
    call = capture_first_call(tiny, _patch(tiny.model, shift=shift))
    plain = capture_first_call(tiny, tiny.model)["cond_denoised"]
    assert (call["cond_denoised"] - plain).abs().max() > 0.05  # windows change the prediction
    plugin = HiDiffusion(raunet=False, shift=int(shift), force=True)
    assert torch.allclose(diffusers_prediction(tiny, call, plugin), call["cond_denoised"], rtol=0, atol=1e-3)
