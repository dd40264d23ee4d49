"""NeighborhoodAttention on tiny DiT pipelines: idle at native size, local above it, where the text tokens
are, schedules, proportional attention, RoPE scaling, composition with head-level PAG, restore, bad input."""

from __future__ import annotations

import pytest
import torch

import attnsurgery as surg
from attnsurgery import NeighborhoodAttention, PerturbedAttention
from attnsurgery.ops.neighborhood import neighborhood_attention
from attnsurgery.ops.neighborhood_spec import NeighborhoodSpec
from attnsurgery.processors import neighborhood as neighborhood_processor
from attnsurgery.processors.sdpa_intercept import FirstAttentionCall
from attnsurgery.testing import restore
from attnsurgery.testing.tiny import tiny_sd3, tiny_sd15
from tests.support.dit_families import FAMILIES, NATIVE_PX, build, denoiser
from tests.support.dit_families import latents as _latents


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_pipe(request):
    return request.param, build(request.param)


@pytest.fixture(scope="module")
def flux():
    return build("flux")


def _with(pipe, *plugins, name: str = "flux", **kwargs) -> torch.Tensor:
    with surg.patched(pipe, *plugins):
        return _latents(pipe, name, **kwargs)


SMALL = NeighborhoodAttention(window=2)  # a 2x2 window on the 4x4 / 8x8 grids of the tiny models


# ---------------------------------------------------------------------------------------- every family
def test_idle_at_native_size_and_local_above_it(family_pipe):
    name, pipe = family_pipe
    native_plain = _latents(pipe, name, size=NATIVE_PX)
    assert torch.equal(_with(pipe, SMALL, name=name, size=NATIVE_PX), native_plain)
    plain = _latents(pipe, name)
    local = _with(pipe, SMALL, name=name)
    assert (local - plain).abs().max() > 1e-3 * plain.abs().max()


def test_a_window_over_the_whole_grid_is_dense_attention(family_pipe, monkeypatch):
    """Equal to plain although every layer's attention went through the op (counted: an idle plugin would
    pass the comparison too)."""
    name, pipe = family_pipe
    plain = _latents(pipe, name)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[3])  # the grid
        return neighborhood_attention(*args, **kwargs)

    monkeypatch.setattr(neighborhood_processor, "neighborhood_attention", counted)
    whole = _with(pipe, NeighborhoodAttention(window=64), name=name)
    assert calls and set(calls) == {(8, 8)}  # 128 px: 8 x 8 image tokens on every family
    torch.testing.assert_close(whole, plain, rtol=1e-4, atol=1e-5)


def test_each_layer_finds_its_image_tokens_where_the_family_declares_them(family_pipe):
    """Every layer's output under the plugin equals its own processor with the SDPA call replaced by the op
    (float64-checked elsewhere) at the layer's declared text placement; the other placement gives another
    output wherever the layer sees text tokens, so the check can fail."""
    name, pipe = family_pipe
    model = denoiser(pipe)
    inputs = {}

    def record(module, args, kwargs):
        inputs[module] = (args, kwargs)

    layers = [layer for layer in surg.describe(model, pipe.vae_scale_factor).layers if layer.kind != "text"]
    hooks = [layer.module.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        with surg.patched(pipe, NeighborhoodAttention(window=2)) as handle, torch.no_grad():
            _latents(pipe, name, steps=1)
            grid = handle.context.token_grids()[0]
            for layer in layers:
                args, kwargs = inputs[layer.module]
                local = _tensors(layer.module(*args, **kwargs))
                wrapper = layer.module.processor
                for text_first in (True, False):
                    seen = {}

                    def by_hand(q, k, v, out, call, text_first=text_first, seen=seen):
                        """Dense attention under the spec's neighbourhood mask plus the call's own mask."""
                        seen["num_text"] = num_text = q.shape[2] - grid[0] * grid[1]
                        spec = NeighborhoodSpec(grid, 2, num_text=num_text, text_first=text_first)
                        allowed, mask = spec.token_mask(), call["attn_mask"]
                        if mask is not None and mask.dtype == torch.bool:
                            allowed = allowed & mask
                        bias = torch.zeros(()) if mask is None or mask.dtype == torch.bool else mask
                        bias = torch.where(allowed, bias, float("-inf"))
                        return torch.nn.functional.scaled_dot_product_attention(
                            q, k, v, attn_mask=bias, scale=call["scale"]
                        )

                    layer.module.processor = wrapper.inner
                    try:
                        with FirstAttentionCall(by_hand):
                            expected = _tensors(layer.module(*args, **kwargs))
                    finally:
                        layer.module.processor = wrapper
                    close = all(
                        torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(local, expected, strict=True)
                    )
                    declared = text_first == (layer.text_placement == "first")
                    if declared:
                        assert close, f"{layer.path}: the plugin disagrees with its declared placement"
                    elif seen["num_text"] > 0:
                        assert not close, f"{layer.path}: the other placement agrees too; the check cannot fail"
    finally:
        for hook in hooks:
            hook.remove()


def _tensors(output) -> list[torch.Tensor]:
    return list(output) if isinstance(output, tuple) else [output]


def test_remove_is_exact_also_after_an_exception_mid_step(family_pipe):
    name, pipe = family_pipe
    plain = _latents(pipe, name)  # first: diffusers and transformers add attributes lazily on a first call
    before = restore.snapshot(pipe)

    def fail(pipe, step, timestep, kwargs):
        raise RuntimeError("stop at step 0")

    with pytest.raises(RuntimeError, match="stop at step 0"):
        with surg.patched(pipe, SMALL):
            _latents(pipe, name, callback_on_step_end=fail)
    restore.assert_restored(pipe, before)
    assert torch.equal(_latents(pipe, name), plain)


# ------------------------------------------------------------------------------------------ options
def test_start_and_stop_choose_the_local_steps(flux):
    plain, full = _latents(flux), _with(flux, SMALL)
    first_only = _with(flux, NeighborhoodAttention(window=2, stop=0.5))
    last_only = _with(flux, NeighborhoodAttention(window=2, start=0.5))
    for partial in (first_only, last_only):
        assert not torch.equal(partial, plain) and not torch.equal(partial, full)
    assert not torch.equal(first_only, last_only)


def test_force_acts_at_native_size(flux):
    plain = _latents(flux, size=NATIVE_PX)
    assert not torch.equal(_with(flux, NeighborhoodAttention(window=2, force=True), size=NATIVE_PX), plain)


def test_proportional_scales_the_layers_that_stay_global(flux):
    some = NeighborhoodAttention(window=2, layers="transformer_blocks.0")
    scaled = NeighborhoodAttention(window=2, layers="transformer_blocks.0", proportional=True)
    assert not torch.equal(_with(flux, some), _with(flux, scaled))
    native = _latents(flux, size=NATIVE_PX)  # at native size nothing is scaled
    assert torch.equal(_with(flux, scaled, size=NATIVE_PX), native)


def test_composes_with_head_level_perturbation_in_either_order(flux):
    pag = PerturbedAttention(scale=3.0, heads=["transformer_blocks.0.attn:0"])
    local_pag = _with(flux, SMALL, pag)
    pag_local = _with(flux, pag, SMALL)
    torch.testing.assert_close(local_pag, pag_local, rtol=1e-5, atol=1e-6)
    assert not torch.equal(local_pag, _with(flux, SMALL))
    assert not torch.equal(local_pag, _with(flux, pag))


@pytest.mark.parametrize("rope", ["ntk", "yarn"])
def test_rope_scaling_acts_above_native_size_and_restores(flux, rope):
    plugin = NeighborhoodAttention(window=64, rope=rope)  # dense attention: only the RoPE changes
    embedding = flux.transformer.pos_embed
    native = _latents(flux, size=NATIVE_PX)
    assert torch.equal(_with(flux, plugin, size=NATIVE_PX), native)
    assert not torch.allclose(_with(flux, plugin), _latents(flux), atol=1e-5)
    assert flux.transformer.pos_embed is embedding


def test_cli_flags_build_the_plugin_and_metadata_round_trips():
    import argparse

    from attnsurgery.cli.plugin_flags import add_plugin_flags, plugins_from_args

    parser = argparse.ArgumentParser()
    add_plugin_flags(parser)
    args = parser.parse_args(
        ["--na", "--na-window", "8x16", "--na-stride", "4", "--na-start", "0.2", "--na-rope", "ntk"]
    )
    (plugin,) = plugins_from_args(args)
    assert plugin == NeighborhoodAttention(window=(8, 16), stride=4, start=0.2, rope="ntk")
    assert surg.plugin_from_dict(plugin.to_dict()) == plugin


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(window=0), "window must be a positive int"),
        (dict(window=(4, -1)), "window must be a positive int"),
        (dict(stride=0), "stride must be a positive int"),
        (dict(window=4, stride=8), "stride .* exceeds the window"),
        (dict(dilation=True), "dilation must be a positive int"),
        (dict(start=0.5, stop=0.5), "must be below stop"),
        (dict(stop=1.5), "stop=1.5 is invalid"),
        (dict(start=float("nan")), "start=nan is invalid"),
        (dict(layers=3), "layers=3 is invalid"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(rope="linear"), "rope must be None or one of"),
    ],
)
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NeighborhoodAttention(**kwargs)


def test_a_unet_is_pointed_to_hidiffusion():
    pipe = tiny_sd15()
    with pytest.raises(ValueError, match="HiDiffusion"):
        surg.apply(pipe, NeighborhoodAttention())


def test_rope_on_a_family_without_flux_rope_is_refused():
    with pytest.raises(ValueError, match="rope='ntk' rescales FLUX-family RoPE"):
        surg.apply(tiny_sd3(num_layers=2), NeighborhoodAttention(rope="ntk"))
