"""The ConvFusion node in the real ComfyUI: effect, untouched input model, non-square parity, bad files, guards."""

from __future__ import annotations

import logging

import pytest
import torch

from attnsurgery.comfy.convfusion import AttnSurgeryConvFusion
from attnsurgery.comfy.perturbed_attention import AttnSurgeryPerturbedAttention
from attnsurgery.comfy.token_merging import AttnSurgeryTokenMerging
from attnsurgery.convfusion import ConvFusion
from attnsurgery.convfusion.format import CONFIG_NAME, architecture_fingerprint, save_blocks
from attnsurgery.ops.pyramid_conv import PyramidConvBlock
from tests.support.comfy.parity import capture_first_call, diffusers_prediction, diffusers_twin
from tests.support.comfy.tiny_comfy import sample

NON_SQUARE = (16, 24)  # grids 16x24, 8x12, 4x6, 2x3: a transposed or square-guessed grid would show


@pytest.fixture(scope="module")
def fingerprint():
    return architecture_fingerprint(diffusers_twin())


@pytest.fixture(scope="module")
def folder(tmp_path_factory, fingerprint):
    """Blocks for every self-attention layer of the tiny model, with outputs large enough to matter."""
    twin = diffusers_twin()
    widths = {name: m.to_q.in_features for name, m in twin.named_modules() if name.endswith(".attn1")}
    generator = torch.Generator().manual_seed(0)
    blocks = {
        path: PyramidConvBlock(width, 3 + 2 * (i % 2), out_init_std=0.05, generator=generator)
        for i, (path, width) in enumerate(widths.items())
    }
    return save_blocks(tmp_path_factory.mktemp("convfusion"), blocks, fingerprint)


def _patch(model, path):
    return AttnSurgeryConvFusion().patch(model, str(path))[0]


def _run(tiny, model, **options):
    return sample(model, tiny.positive, tiny.negative, **options)


def test_blocks_change_the_sample_and_leave_the_input_model_alone(tiny, folder):
    patched = _patch(tiny.model, folder)
    fused = _run(tiny, patched)
    assert torch.isfinite(fused).all() and (fused - tiny.baseline).abs().max() > 1e-2
    # Patching again while the first clone's object patches sit in the shared U-Net; a file names its folder.
    assert torch.equal(_run(tiny, _patch(tiny.model, folder / CONFIG_NAME)), fused)
    assert torch.equal(_run(tiny, tiny.model), tiny.baseline)


def test_non_square_latent_matches_the_diffusers_plugin(tiny, folder):
    call = capture_first_call(tiny, _patch(tiny.model, folder), size=NON_SQUARE)
    assert tuple(call["input"].shape[-2:]) == NON_SQUARE
    plain = capture_first_call(tiny, tiny.model, size=NON_SQUARE)["cond_denoised"]
    assert (call["cond_denoised"] - plain).abs().max() > 0.05  # the blocks change the prediction
    fused = diffusers_prediction(tiny, call, ConvFusion.from_pretrained(folder))
    assert torch.allclose(fused, call["cond_denoised"], rtol=0, atol=1e-4)


def test_files_for_another_model_fail_clearly(tiny, tmp_path, fingerprint):
    generator = torch.Generator().manual_seed(1)
    top = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    cases = {
        "lacks": ({"down_blocks.3.attentions.0.transformer_blocks.0.attn1": 128}, fingerprint),
        "has 64 channels, the model 32": ({top: 64}, fingerprint),
        "cross_attention_dim: saved 768, model 64": ({top: 32}, {**fingerprint, "cross_attention_dim": 768}),
    }
    for i, (message, (widths, saved)) in enumerate(cases.items()):
        blocks = {path: PyramidConvBlock(width, 3, generator=generator) for path, width in widths.items()}
        save_blocks(tmp_path / str(i), blocks, saved)
        with pytest.raises(ValueError, match=message) as error:
            _patch(tiny.model, tmp_path / str(i))
        if i < 2:  # the layer mismatches list what the model has
            assert f"{top} (32 channels)" in str(error.value)
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        _patch(tiny.model, tmp_path / "missing")
    with pytest.raises(ValueError, match="No path given"):
        _patch(tiny.model, " ")


def test_attention_patches_on_convfusion_layers_are_refused(tiny, folder):
    patched = _patch(tiny.model, folder)
    with pytest.raises(ValueError, match="both change the tokens"):
        AttnSurgeryTokenMerging().patch(patched, 0.5, 2, 2, "top", 0)
    guided = AttnSurgeryPerturbedAttention().patch(patched, 3.0, "mid_block", 1.0, "identity", 2.0, 0.0, 1.0)[0]
    with pytest.raises(ValueError, match="no attention to patch"):
        _run(tiny, guided, steps=1)


def test_wrappers_chain_and_a_lost_wrapper_fails_clearly(tiny, folder):
    calls = []

    def counting(apply_model, args):
        calls.append(tuple(args["input"].shape))
        return apply_model(args["input"], args["timestep"], **args["c"])

    earlier = tiny.model.clone()
    earlier.set_model_unet_function_wrapper(counting)
    fused = _run(tiny, _patch(earlier, folder), steps=1)
    assert calls and torch.equal(fused, _run(tiny, _patch(tiny.model, folder), steps=1))
    later = _patch(tiny.model, folder)
    later.set_model_unet_function_wrapper(counting)
    if tiny.comfyui.modern:  # ConvFusion's wrapper is keyed: the single slot is another
        assert torch.equal(_run(tiny, later, steps=1), fused)
        return
    with pytest.raises(RuntimeError, match="outside its U-Net wrapper"):  # 2024: that slot was ConvFusion's
        _run(tiny, later, steps=1)


def test_weight_patches_on_replaced_layers_are_reported(tiny, folder, caplog):
    with_lora = tiny.model.clone()
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert with_lora.add_patches({key: (torch.zeros(32, 32),)}) == [key]
    with caplog.at_level(logging.WARNING, logger="attnsurgery.comfy.convfusion"):
        _patch(tiny.model, folder)
        assert not caplog.records
        _patch(with_lora, folder)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1" in caplog.text


def test_a_lora_on_another_clone_keeps_its_attn1_keys_while_convfusion_is_loaded(tiny, folder):
    """ComfyUI leaves the ConvFusion clone's blocks in the shared U-Net after sampling; 0.20.1 accepts only the
    weight patches whose keys the U-Net has then, so the blocks carry the replaced attn1's projections."""
    _run(tiny, _patch(tiny.model, folder), steps=1)  # loaded: its blocks now sit in the shared U-Net
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    with_lora = tiny.model.clone()
    delta = torch.randn(32, 32, generator=torch.Generator().manual_seed(2))  # not constant: normed inputs sum to 0
    assert with_lora.add_patches({key: (delta,)}) == [key]
    assert (_run(tiny, with_lora, steps=1) - _run(tiny, tiny.model, steps=1)).abs().max() > 1e-3  # and it acts
    assert torch.equal(_run(tiny, tiny.model), tiny.baseline)
