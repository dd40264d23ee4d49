"""LoRA before or after every plugin (issue 17, point 5): attention and conv LoRAs load, change weight, fuse,
unfuse and unload under every plugin in either order, or are refused clearly where they cannot act (ConvFusion).
The LoRAs are tiny random ones written to a folder and loaded with ``pipe.load_lora_weights``, as users do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attnsurgery as surg
from tests.support.lora import WEIGHT_NAME, write_lora
from tests.support.matrix import PLUGINS, UNET_PX, changed, close, denoiser, sd15
from tests.support.pipes import run_pipe

UNET_TARGETS = ("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.to_out.0", "downsamplers.0.conv")
DIT_TARGETS = ("attn.to_q", "attn.to_v", "attn.add_k_proj", "proj_mlp")


def _lora_folder(pipe, folder: Path) -> Path:
    """A LoRA on attention projections of every kind (and the U-Net's downsampler convs, RAD's site)."""
    model = denoiser(pipe)
    targets = UNET_TARGETS if hasattr(pipe, "unet") else DIT_TARGETS
    paths = [name for name, _ in model.named_modules() if name.endswith(targets)]
    return write_lora(model, "unet" if hasattr(pipe, "unet") else "transformer", paths, folder)


def _load(pipe, folder: Path) -> None:
    pipe.load_lora_weights(folder, weight_name=WEIGHT_NAME, adapter_name="style")


@pytest.mark.parametrize("case", list(PLUGINS))
def test_lora_before_or_after_a_plugin(case, tmp_path):
    builder, plugin, kwargs = PLUGINS[case]
    pipe = builder()
    folder = _lora_folder(pipe, tmp_path)
    base = run_pipe(pipe, **kwargs)
    _load(pipe, folder)
    lora = run_pipe(pipe, **kwargs)
    with surg.patched(pipe, plugin()):  # LoRA first
        both = run_pipe(pipe, **kwargs)
    pipe.unload_lora_weights()
    handle = surg.apply(pipe, plugin())
    alone = run_pipe(pipe, **kwargs)
    assert changed(lora, base) and changed(alone, base), "the LoRA and the plugin must each act"
    assert changed(both, alone) and changed(both, lora), "LoRA first: both must act together"

    _load(pipe, folder)  # LoRA after the plugin
    assert close(run_pipe(pipe, **kwargs), both)
    pipe.set_adapters("style", 0.5)
    half = run_pipe(pipe, **kwargs)
    assert changed(half, both) and changed(half, alone)
    pipe.set_adapters("style", 1.0)
    pipe.fuse_lora()
    assert close(run_pipe(pipe, **kwargs), both)
    pipe.unfuse_lora()
    assert close(run_pipe(pipe, **kwargs), both)
    pipe.unload_lora_weights()  # fuse then unfuse leaves rounding in the weights, with or without a plugin
    assert close(run_pipe(pipe, **kwargs), alone)
    handle.remove()
    assert close(run_pipe(pipe, **kwargs), base)


def test_hidiffusion_keeps_rad_when_a_lora_wraps_or_unwraps_the_downsampler_conv(tmp_path):
    """RAD subsamples the downsampler's input: a LoRA loaded after apply saw the full input in its conv branch
    (size mismatch inside peft), and unloading a LoRA loaded before apply took RAD's hook away with the wrapper."""
    pipe = sd15()
    folder = write_lora(pipe.unet, "unet", ["down_blocks.0.downsamplers.0.conv"], tmp_path)
    hidiffusion = surg.HiDiffusion(force=True, t1=1.0, t2=0.0, window_attn=False)  # RAD only, every step
    base = run_pipe(pipe, size=UNET_PX)
    with surg.patched(pipe, hidiffusion):
        rad = run_pipe(pipe, size=UNET_PX)
        _load(pipe, folder)
        rad_lora = run_pipe(pipe, size=UNET_PX)
        pipe.unload_lora_weights()
        assert torch.equal(run_pipe(pipe, size=UNET_PX), rad)
    assert changed(rad, base) and changed(rad_lora, rad)
    _load(pipe, folder)
    with surg.patched(pipe, hidiffusion):
        assert close(run_pipe(pipe, size=UNET_PX), rad_lora)
        pipe.unload_lora_weights()
        assert torch.equal(run_pipe(pipe, size=UNET_PX), rad)


LORA_CALLS = {
    "load_lora_weights": lambda pipe, folder: _load(pipe, folder),
    "set_adapters": lambda pipe, folder: pipe.set_adapters("style", 0.5),
    "fuse_lora": lambda pipe, folder: pipe.fuse_lora(),
    "disable_lora": lambda pipe, folder: pipe.disable_lora(),
    "unload_lora_weights": lambda pipe, folder: pipe.unload_lora_weights(),
    "delete_adapters": lambda pipe, folder: pipe.delete_adapters("style"),
}


@pytest.mark.parametrize("call", list(LORA_CALLS))
def test_convfusion_refuses_lora_calls_and_keeps_the_lora_for_after_remove(call, tmp_path):
    """peft cannot reach the attention modules ConvFusion set aside: a load after apply dropped their LoRA
    weights for good, an unload left them behind. Refused, and the LoRA loaded before is whole after remove."""
    pipe = sd15()
    folder = _lora_folder(pipe, tmp_path)
    if call == "load_lora_weights":
        before = run_pipe(pipe, size=UNET_PX)
        handle = surg.apply(pipe, surg.ConvFusion())
    else:
        base = run_pipe(pipe, size=UNET_PX)
        _load(pipe, folder)
        before = run_pipe(pipe, size=UNET_PX)
        assert changed(before, base), "the LoRA must act, or 'whole after remove' compares nothing"
        with pytest.warns(UserWarning, match="LoRA weights on 16 attn1 layers no longer apply.*after remove"):
            handle = surg.apply(pipe, surg.ConvFusion())
    blocks = run_pipe(pipe, size=UNET_PX)
    with pytest.raises(RuntimeError, match=r"refused while ConvFusion replaces the attn1 layers.*handle\.remove\(\)"):
        LORA_CALLS[call](pipe, folder)
    assert torch.equal(run_pipe(pipe, size=UNET_PX), blocks)
    handle.remove()
    assert changed(blocks, before)
    assert torch.equal(run_pipe(pipe, size=UNET_PX), before)
    LORA_CALLS[call](pipe, folder)  # allowed again
    if call == "load_lora_weights":  # the refused load would have changed the output
        assert changed(run_pipe(pipe, size=UNET_PX), before)
