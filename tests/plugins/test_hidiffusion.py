"""HiDiffusion behaviour on the tiny SD1.5/SDXL pipelines: gating, schedule, sizes, pipelines, restore."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionAdapterPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    T2IAdapter,
)

import attnsurgery as surg
from attnsurgery.context import StepContext
from attnsurgery.ops.windows import WindowGrid
from attnsurgery.plugins.hidiffusion import HiDiffusion, unet_layout
from attnsurgery.processors.window_attention import WindowAttentionProcessor
from attnsurgery.testing import snapshot as state_of
from attnsurgery.testing import tiny
from tests.support.hidiffusion_peer import run_latents

ABOVE_NATIVE = 320  # the tiny models are native at 256 px (latent 32)


def changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 1e-3)


def test_native_size_changes_nothing_unless_forced(sd15):
    plain = run_latents(sd15, 256, steps=3)
    with surg.patched(sd15, HiDiffusion(t1=0.5)):
        assert torch.equal(run_latents(sd15, 256, steps=3), plain)
    with surg.patched(sd15, HiDiffusion(t1=0.5, force=True)):
        assert changed(run_latents(sd15, 256, steps=3), plain)


def test_remove_restores_bit_identical_output_and_state(sdxl):
    plain = run_latents(sdxl, ABOVE_NATIVE, steps=3)
    before_state = state_of(sdxl)  # after a first run: transformers hooks its text encoders lazily
    upsamplers = sdxl.unet.num_upsamplers
    handle = surg.apply(sdxl, HiDiffusion(t1=0.5, aggressive=False, t2=0.4))
    assert changed(run_latents(sdxl, ABOVE_NATIVE, steps=3), plain)
    handle.remove()
    assert state_of(sdxl) == before_state
    assert sdxl.unet.num_upsamplers == upsamplers
    assert torch.equal(run_latents(sdxl, ABOVE_NATIVE, steps=3), plain)


def test_one_window_equals_plain_attention(sd15):
    plain = run_latents(sd15, ABOVE_NATIVE)
    handle = surg.apply(sd15)
    context = handle.context
    for layer in handle.model.select("all", kinds=("self",)):
        plan = lambda n: WindowGrid(*context.grid_for(n), rows=1, cols=1)  # noqa: E731
        handle.set_processor(layer, WindowAttentionProcessor(layer.module.processor, plan), role="tokens")
    try:
        assert torch.equal(run_latents(sd15, ABOVE_NATIVE), plain)
    finally:
        handle.remove()


# Spec "Schedules": a module with ratio r acts while step < floor(N * r); aggressive: RAD/RAU while
# step < floor(8N/50), pool/unpool from there until floor(N * T1). Values: (rad, pool) per step count.
SCHEDULES = {
    # SD1.x image < 2048 px: T1 0.4 drives RAD/RAU, T2 0 (pool never).
    ("sd15", 128, False): {10: ((0, 4), None), 20: ((0, 8), None), 25: ((0, 10), None), 50: ((0, 20), None)},
    # SD1.x image >= 2048 px: T1 0.7 (RAD/RAU), T2 0.3 (pool/unpool).
    ("sd15", 256, False): {10: ((0, 7), (0, 3)), 20: ((0, 14), (0, 6)), 25: ((0, 17), (0, 7)), 50: ((0, 35), (0, 15))},
    # SDXL image < 4096 px, aggressive: RAD/RAU first 8/50, then pool/unpool until T1 0.4.
    ("sdxl", 256, False): {10: ((0, 1), (1, 4)), 20: ((0, 3), (3, 8)), 25: ((0, 4), (4, 10)), 50: ((0, 8), (8, 20))},
    # SDXL with ControlNet residuals: T1 0.5.
    ("sdxl", 256, True): {10: ((0, 1), (1, 5)), 20: ((0, 3), (3, 10)), 25: ((0, 4), (4, 12)), 50: ((0, 8), (8, 25))},
    # SDXL image >= 4096 px: T1 0.7 drives pool/unpool, T2 0.3 drives RAD/RAU.
    ("sdxl", 512, False): {10: ((0, 3), (0, 7)), 20: ((0, 6), (0, 14)), 25: ((0, 7), (0, 17)), 50: ((0, 15), (0, 35))},
}


def _steps_in(span, num_steps):
    return [span is not None and span[0] <= step < span[1] for step in range(num_steps)]


@pytest.mark.parametrize("key", list(SCHEDULES), ids=lambda k: f"{k[0]}-latent{k[1]}-controlnet{k[2]}")
def test_t1_t2_boundaries_follow_the_spec(key):
    family_name, latent, controlnet = key
    pipe = tiny.tiny_sd15() if family_name == "sd15" else tiny.tiny_sdxl()
    family = surg.detect_family(pipe.unet)
    layout = unet_layout(pipe.unet, family)
    # the spec's latent sides are the real models' (512 / 1024 px native); the presets read them relative to native
    family = dataclasses.replace(family, native_resolution=512 if family_name == "sd15" else 1024, vae_scale_factor=8)
    plugin = HiDiffusion()
    for num_steps, (rad_span, pool_span) in SCHEDULES[key].items():
        context = StepContext(family, latent_hw=(latent, latent), num_steps=num_steps)
        phases = [
            plugin.raunet_phase(dataclasses.replace(context, step_index=s), layout, controlnet)
            for s in range(num_steps)
        ]
        assert [p.rad for p in phases] == _steps_in(rad_span, num_steps), (num_steps, "rad")
        assert [p.pool for p in phases] == _steps_in(pool_span, num_steps), (num_steps, "pool")


def test_few_step_sdxl_uses_the_turbo_preset():
    pipe = tiny.tiny_sdxl()
    family = surg.detect_family(pipe.unet)
    layout = unet_layout(pipe.unet, family)
    context = StepContext(family, latent_hw=(128, 128), num_steps=4)
    phases = [HiDiffusion().raunet_phase(dataclasses.replace(context, step_index=s), layout, False) for s in range(4)]
    assert [p.pool for p in phases] == [True, True, False, False]  # T1 0.5
    assert not any(p.rad for p in phases)  # no T2 modules


def test_schedule_lands_on_the_pipeline_steps(sd15, monkeypatch):
    seen = []
    phase = HiDiffusion.raunet_phase

    def recording(self, context, layout, controlnet):
        result = phase(self, context, layout, controlnet)
        seen.append((context.step_index, result.rad, result.pool))
        return result

    monkeypatch.setattr(HiDiffusion, "raunet_phase", recording)
    with surg.patched(sd15, HiDiffusion(t1=0.4, t2=0.2, force=True, window_attn=False)):
        run_latents(sd15, 128, steps=10)
    assert seen == [(s, s < 4, s < 2) for s in range(10)]


def _no_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    ours = [w for w in caught if not issubclass(w.category, DeprecationWarning)]
    assert not ours, [str(w.message) for w in ours]
    return result


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_odd_and_non_square_sizes_run_without_warnings(family):
    pipe = tiny.tiny_sd15() if family == "sd15" else tiny.tiny_sdxl()
    pipe.set_progress_bar_config(disable=True)
    size = (328, 264)  # latent 41 x 33: odd at every windowed and pooled level
    plain = run_latents(pipe, size, steps=3)
    with surg.patched(pipe, HiDiffusion(t1=0.5, t2=0.5, aggressive=False)):
        out = _no_warnings(lambda: run_latents(pipe, size, steps=3))
    assert out.shape == plain.shape and torch.isfinite(out).all()
    assert changed(out, plain)


def _control_pipe(family):
    base = tiny.tiny_sd15() if family == "sd15" else tiny.tiny_sdxl()
    controlnet = ControlNetModel.from_unet(base.unet).eval()
    cls = StableDiffusionControlNetPipeline if family == "sd15" else StableDiffusionXLControlNetPipeline
    components = {k: v for k, v in base.components.items() if k in cls._get_signature_keys(cls)[0]}
    pipe = cls(**components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_controlnet_residuals_follow_raunet(family):
    pipe = _control_pipe(family)
    image = torch.rand(1, 3, ABOVE_NATIVE, ABOVE_NATIVE)
    plain = run_latents(pipe, ABOVE_NATIVE, steps=3, image=image)
    with surg.patched(pipe, HiDiffusion(t1=0.5, t2=0.5, aggressive=False)):
        out = run_latents(pipe, ABOVE_NATIVE, steps=3, image=image)
    assert torch.isfinite(out).all() and changed(out, plain)


def test_t2i_adapter_residuals_follow_raunet():
    """T2I-Adapter residuals are added inside the down blocks; without resizing they crash RAU-Net's steps."""
    base = tiny.tiny_sd15()
    torch.manual_seed(0)
    adapter = T2IAdapter(
        in_channels=3,
        channels=list(base.unet.config.block_out_channels),
        num_res_blocks=1,
        downscale_factor=8,
        adapter_type="full_adapter",
    )
    components = {k: v for k, v in base.components.items() if k != "image_encoder"}
    pipe = StableDiffusionAdapterPipeline(**components, adapter=adapter)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, ABOVE_NATIVE, ABOVE_NATIVE)
    with surg.patched(pipe, HiDiffusion(t1=0.5, t2=0.5, window_attn=False)):
        out = run_latents(pipe, ABOVE_NATIVE, steps=3, image=image)
        without = run_latents(pipe, ABOVE_NATIVE, steps=3, image=image, adapter_conditioning_scale=0.0)
        plain_raunet = run_latents(base, ABOVE_NATIVE, steps=3)
    assert torch.isfinite(out).all() and changed(out, without)  # the adapter still acts
    assert changed(without, run_latents(base, ABOVE_NATIVE, steps=3))  # and RAU-Net acted
    assert torch.allclose(without, plain_raunet, atol=1e-5)  # zero-scale residuals change nothing


def test_img2img_and_inpainting(sd15):
    image = torch.rand(1, 3, ABOVE_NATIVE, ABOVE_NATIVE)
    img2img = StableDiffusionImg2ImgPipeline(**sd15.components)
    inpaint_base = tiny.tiny_sd15(in_channels=9)
    inpaint = StableDiffusionInpaintPipeline(**inpaint_base.components)
    mask = torch.zeros(1, 1, ABOVE_NATIVE, ABOVE_NATIVE)
    mask[..., 64:200, 80:240] = 1
    for pipe, kwargs in [
        (img2img, dict(image=image, strength=1.0)),
        (inpaint, dict(image=image, mask_image=mask, strength=1.0)),
    ]:
        pipe.set_progress_bar_config(disable=True)
        plain = run_latents(pipe, ABOVE_NATIVE, steps=3, **kwargs)
        with surg.patched(pipe, HiDiffusion(t1=0.5, t2=0.5)):
            out = run_latents(pipe, ABOVE_NATIVE, steps=3, **kwargs)
        assert torch.isfinite(out).all() and changed(out, plain)


def test_single_step_sdxl_runs(sdxl):
    plain = run_latents(sdxl, ABOVE_NATIVE, steps=1, guidance_scale=0.0)
    with surg.patched(sdxl, HiDiffusion()):
        out = run_latents(sdxl, ABOVE_NATIVE, steps=1, guidance_scale=0.0)
    assert changed(out, plain)  # MSW-MSA acts; RAU-Net's floor(1 * 0.5) = 0 steps


def test_shift_modes_and_private_rng(sd15):
    handle = surg.apply(sd15)
    try:
        context = handle.context
        path = handle.model.select("top", kinds=("self",))[0].path
        context.timestep, context.num_steps = 500.0, 8
        indices = {}
        for shift in ("random", "cycle", 2):
            for seed in (0, 1):
                plugin = HiDiffusion(shift=shift, seed=seed)
                indices[shift, seed] = []
                for step in range(8):
                    context.step_index = step
                    indices[shift, seed].append(plugin.shift_index(handle, path))
        assert indices["cycle", 0] == [s % 4 for s in range(8)]
        assert indices[2, 0] == [2] * 8
        assert indices["random", 0] != indices["random", 1]
        again = [HiDiffusion(seed=0).shift_index(handle, path) for context.step_index in range(8)]
        assert again == indices["random", 0]
    finally:
        handle.remove()
    rng = torch.get_rng_state()
    with surg.patched(sd15, HiDiffusion()):
        run_latents(sd15, ABOVE_NATIVE)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(raunet=False, window_attn=False), "does nothing"),
        (dict(t1=1.5), "t1=1.5"),
        (dict(t2=-0.1), "t2=-0.1"),
        (dict(shift="sometimes"), "shift='sometimes'"),
        (dict(shift=4), "shift=4"),
        (dict(aggressive="yes"), "aggressive='yes'"),
        (dict(seed=1.5), "seed=1.5"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HiDiffusion(**kwargs)


def test_dit_models_are_refused_cleanly():
    transformer = tiny.tiny_sd3().transformer
    with pytest.raises(NotImplementedError, match="SD1.x, SD2.x and SDXL"):
        surg.apply(transformer, HiDiffusion())
    assert surg.active_surgeries(transformer) == []


def test_round_trips_through_a_dict():
    plugin = HiDiffusion(t1=0.5, shift="cycle", seed=7)
    assert surg.plugin_from_dict(plugin.to_dict()) == plugin


def test_windows_wrap_the_layers_own_processor_and_double_apply_conflicts(sd15):
    layers = surg.describe(sd15.unet).select(["down_blocks.0.attentions", "up_blocks.3.attentions"], kinds=("self",))
    before = {layer.path: layer.module.processor for layer in layers}
    with surg.patched(sd15, HiDiffusion()) as handle:
        for layer in layers:
            assert isinstance(layer.module.processor, WindowAttentionProcessor)
            assert layer.module.processor.inner is before[layer.path]
        with pytest.raises(ValueError, match="conflict"):
            surg.apply(sd15, HiDiffusion())
        assert surg.active_surgeries(sd15) == [handle]
    assert {layer.path: layer.module.processor for layer in layers} == before


def test_sd2_unet_gets_the_sd_layout():
    torch.manual_seed(0)
    unet = tiny.tiny_sd15().unet
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    config.update(use_linear_projection=True, attention_head_dim=(2, 4, 8, 8))
    sd2 = type(unet).from_config(config).eval()
    assert surg.detect_family(sd2).name == "sd2"
    latent = torch.randn(1, 4, 40, 40)
    text = torch.randn(1, 77, config["cross_attention_dim"])
    with torch.no_grad():
        plain = sd2(latent, 999, encoder_hidden_states=text).sample
        with surg.patched(sd2, HiDiffusion()) as handle:  # bare U-Net: t 999 is the first step
            out = sd2(latent, 999, encoder_hidden_states=text).sample
            assert "down_blocks.0.downsamplers.0: forward pre-hook rad" in handle.changes
        assert torch.equal(sd2(latent, 999, encoder_hidden_states=text).sample, plain)
    assert changed(out, plain)


def test_unusual_downsampler_refuses_raunet_but_allows_windows():
    unet = tiny.tiny_sd15().unet
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    odd = type(unet).from_config({**config, "downsample_padding": 0}).eval()
    with pytest.raises(NotImplementedError, match="raunet=False"):
        surg.apply(odd, HiDiffusion())
    assert surg.active_surgeries(odd) == []
    with surg.patched(odd, HiDiffusion(raunet=False)) as handle:
        assert any(site.endswith("attn1") for site in handle.sites)


def test_works_before_and_after_model_cpu_offload(sd15):
    plain = run_latents(sd15, ABOVE_NATIVE, steps=3)
    handle = surg.apply(sd15, HiDiffusion(t1=0.5))  # applied before offloading
    expected = run_latents(sd15, ABOVE_NATIVE, steps=3)
    sd15.enable_model_cpu_offload(device="cpu")
    assert torch.equal(run_latents(sd15, ABOVE_NATIVE, steps=3), expected)
    handle.remove()
    assert torch.equal(run_latents(sd15, ABOVE_NATIVE, steps=3), plain)
    with surg.patched(sd15, HiDiffusion(t1=0.5)):  # applied after offloading
        assert torch.equal(run_latents(sd15, ABOVE_NATIVE, steps=3), expected)
    assert changed(expected, plain)


def test_preset_timing_is_relative_to_the_native_latent():
    """SD1.5 (native latent 64) switches to the 4x timing at latent 256, as the peer's absolute threshold does;
    a 64 px model (native latent 16) switches at latent 64, its own 4x, where the absolute rule would not."""
    from attnsurgery.families import Family
    from attnsurgery.plugins.hidiffusion import preset_timing

    sd15 = Family("sd15", "unet", native_resolution=512, vae_scale_factor=8)
    small = Family("sd15", "unet", native_resolution=64, vae_scale_factor=4)
    assert preset_timing(sd15, (128, 128), 20, controlnet=False).t1 == 0.4
    assert preset_timing(sd15, (256, 256), 20, controlnet=False).t1 == 0.7
    assert preset_timing(small, (32, 32), 20, controlnet=False).t1 == 0.4
    assert preset_timing(small, (64, 64), 20, controlnet=False).t1 == 0.7
    sdxl = Family("sdxl", "unet", native_resolution=1024, vae_scale_factor=8)
    assert preset_timing(sdxl, (256, 256), 20, controlnet=False).aggressive
    assert not preset_timing(sdxl, (512, 512), 20, controlnet=False).aggressive
