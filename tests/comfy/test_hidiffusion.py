"""The HiDiffusion RAU-Net node in the real ComfyUI: effect above native, untouched input, no-ops, parity."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from attnsurgery.comfy.hidiffusion import AttnSurgeryHiDiffusion
from attnsurgery.comfy.window_attention import AttnSurgeryWindowAttention
from attnsurgery.ops.raunet import DownBlockShape, down_path_sizes
from attnsurgery.plugins.hidiffusion import HiDiffusion
from tests.support.comfy.parity import capture_first_call, diffusers_prediction, diffusers_twin_sdxl
from tests.support.comfy.tiny_comfy import LATENT_SIZE, MODEL_CHANNELS, build_tiny_sdxl, conditioning, sample

ABOVE_NATIVE = {"size": (72, 16)}  # 576 x 128 px: one side above SD1.5's 512 px
PARITY_SIZE = 32  # big enough that RAD and the pool leave 8x8 and 4x4 grids, not single pixels
# SDXL runs long enough for the full preset (1-4 steps get Turbo's) and for its RAD-alone phase to hold step 0
# (floor(7 * 0.16) = 1), so the first call matches the plugin run without a step count
SDXL_STEPS = 7


def _patch(model, t1=-1.0, t2=-1.0, window=False, shift="random", force=True, aggressive="preset"):
    return AttnSurgeryHiDiffusion().patch(model, t1, t2, aggressive, window, shift, 0, force)[0]


def _run(tiny, model, **kwargs):
    return sample(model, tiny.positive, tiny.negative, **kwargs)


def test_raunet_changes_the_sample_above_native_and_leaves_the_input_model_alone(tiny):
    plain = _run(tiny, tiny.model, steps=2, **ABOVE_NATIVE)
    hires = _run(tiny, _patch(tiny.model, force=False), steps=2, **ABOVE_NATIVE)
    assert torch.isfinite(hires).all() and (hires - plain).abs().max() > 0.1
    assert torch.equal(_run(tiny, tiny.model, steps=2, **ABOVE_NATIVE), plain)
    assert torch.equal(_run(tiny, tiny.model), tiny.baseline)


def test_native_size_and_zero_ratios_are_bit_identical(tiny):
    forced = _run(tiny, _patch(tiny.model, t1=1.0, t2=1.0))
    assert (forced - tiny.baseline).abs().max() > 0.1  # forcing acts at this size, so the no-ops below mean something
    assert torch.equal(_run(tiny, _patch(tiny.model, force=False)), tiny.baseline)  # 128 px < 512 px
    assert torch.equal(_run(tiny, _patch(tiny.model, t1=0.0, t2=0.0)), tiny.baseline)


@pytest.mark.parametrize(("t1", "t2"), [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_raunet_matches_the_diffusers_plugin(tiny, t1, t2):
    """SD1.x: T1 drives RAD/RAU, T2 the block pool; ratio 1 acts in every step, 0 in none."""
    call = capture_first_call(tiny, _patch(tiny.model, t1=t1, t2=t2), size=PARITY_SIZE)
    plain = capture_first_call(tiny, tiny.model, size=PARITY_SIZE)["cond_denoised"]
    assert (call["cond_denoised"] - plain).abs().max() > 0.5  # RAU-Net changes the prediction a lot
    plugin = HiDiffusion(window_attn=False, t1=t1, t2=t2, force=True)
    assert torch.allclose(diffusers_prediction(tiny, call, plugin), call["cond_denoised"], rtol=0, atol=1e-3)


def test_raunet_with_window_attention_matches_the_diffusers_plugin(tiny):
    call = capture_first_call(tiny, _patch(tiny.model, t1=1.0, t2=1.0, window=True, shift="1"), size=PARITY_SIZE)
    raunet_only = capture_first_call(tiny, _patch(tiny.model, t1=1.0, t2=1.0), size=PARITY_SIZE)
    assert (call["cond_denoised"] - raunet_only["cond_denoised"]).abs().max() > 0.05  # windows add to it
    plugin = HiDiffusion(t1=1.0, t2=1.0, shift=1, force=True)
    assert torch.allclose(diffusers_prediction(tiny, call, plugin), call["cond_denoised"], rtol=0, atol=1e-3)


def test_block_patches_decide_the_phase_when_a_caller_bypasses_the_wrapper(tiny):
    patched = _patch(tiny.model, t1=1.0, t2=1.0)
    x = torch.randn(1, 4, PARITY_SIZE, PARITY_SIZE, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([10.0])
    cond = tiny.positive[0][0]
    c = {"c_crossattn": cond, "transformer_options": {**patched.model_options["transformer_options"], "sigmas": sigma}}
    with torch.inference_mode():
        plain = tiny.model.model.apply_model(x, sigma, c_crossattn=cond, transformer_options={"sigmas": sigma})
        direct = patched.model.apply_model(x, sigma, **c)
        if tiny.comfyui.modern:  # keyed wrappers travel in the call's options
            options = {**c["transformer_options"], "wrappers": patched.wrappers}
            wrapped = patched.model.apply_model(x, sigma, **{**c, "transformer_options": options})
        else:
            wrapped = patched.model_options["model_function_wrapper"](
                patched.model.apply_model, {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": [0]}
            )
    assert (direct - plain).abs().max() > 0.5 and torch.equal(direct, wrapped)


def test_a_later_single_slot_wrapper_keeps_the_resizing_where_wrappers_are_keyed(tiny):
    """Newer ComfyUI: RAU-Net's wrapper is keyed, so a later single-slot wrapper leaves it alone; the 2024
    snapshot has only that slot, so a wrapper that does not call on the one it replaces drops the resizing."""
    calls = []

    def overwriting(apply_model, args):
        calls.append(tuple(args["input"].shape))
        return apply_model(args["input"], args["timestep"], **args["c"])

    controlled = _with_control(tiny.positive, with_inputs=False)
    patched = _patch(tiny.model, t1=1.0, t2=1.0)
    later = patched.clone()
    later.set_model_unet_function_wrapper(overwriting)
    resized = sample(patched, controlled, tiny.negative, steps=1, size=PARITY_SIZE)
    out = sample(later, controlled, tiny.negative, steps=1, size=PARITY_SIZE)
    assert calls
    assert torch.equal(out, resized) == tiny.comfyui.modern


def test_bad_input_names_the_problem(tiny):
    with pytest.raises(ValueError, match="t1"):
        _patch(tiny.model, t1=1.5)
    with pytest.raises(ValueError, match="already on this model"):
        _patch(_patch(tiny.model))
    windows = AttnSurgeryWindowAttention().patch(tiny.model, "top", "random", 0, True)[0]
    with pytest.raises(ValueError, match="both change the tokens"):
        _patch(windows, window=True)
    dit = SimpleNamespace(model=SimpleNamespace(diffusion_model=torch.nn.Linear(1, 1)))
    with pytest.raises(NotImplementedError, match="DiTs"):
        _patch(dit)


def _skip_channels() -> tuple[list[int], int]:
    mults = (1, 2, 4, 4)
    channels = [MODEL_CHANNELS]
    for level, mult in enumerate(mults):
        channels += [MODEL_CHANNELS * mult] * (3 if level < len(mults) - 1 else 2)
    return channels, MODEL_CHANNELS * mults[-1]


def _residuals(size: int, batch: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Seeded ControlNet-like residuals at the plain U-Net's skip sizes (what a real ControlNet yields)."""
    shapes = [DownBlockShape(2, (3, 2, 1))] * 3 + [DownBlockShape(2, None)]
    skips, mid = down_path_sizes((size, size), shapes)
    channels, mid_channels = _skip_channels()
    generator = torch.Generator().manual_seed(7)
    skip_residuals = [torch.randn(batch, c, *s, generator=generator) for c, s in zip(channels, skips)]
    return skip_residuals, torch.randn(batch, mid_channels, *mid, generator=generator)


def _with_control(conditioning, with_inputs: bool):
    """The conditioning with a ControlNet stand-in: ComfyUI's ControlBase yielding the fixed residuals."""
    import comfy.controlnet

    class FixedControl(comfy.controlnet.ControlBase):
        def get_control(self, x_noisy, t, cond, batched_number, transformer_options=None):  # 5th: newer ComfyUI
            skips, mid = _residuals(x_noisy.shape[-1], x_noisy.shape[0])
            inputs = [None] * 11 + [s.clone() for s in skips[:1]] if with_inputs else []  # T2I-like, reversed
            return {"input": inputs, "middle": [mid], "output": skips}

        def copy(self):
            return FixedControl()

    return [[tensor, {**options, "control": FixedControl()}] for tensor, options in conditioning]


def test_controlnet_residuals_are_resized_like_the_diffusers_plugin(tiny, caplog):
    controlled = type(tiny)(**{**vars(tiny), "positive": _with_control(tiny.positive, with_inputs=False)})
    with caplog.at_level(logging.WARNING):
        call = capture_first_call(controlled, _patch(tiny.model, t1=1.0, t2=1.0), size=PARITY_SIZE)
    assert "could not be applied" not in caplog.text  # ComfyUI drops residuals whose size does not match
    uncontrolled = capture_first_call(tiny, _patch(tiny.model, t1=1.0, t2=1.0), size=PARITY_SIZE)
    assert (call["cond_denoised"] - uncontrolled["cond_denoised"]).abs().max() > 0.5  # the residuals count
    skips, mid = _residuals(PARITY_SIZE, 1)
    plugin = HiDiffusion(window_attn=False, t1=1.0, t2=1.0, force=True)
    twin = diffusers_prediction(
        tiny, call, plugin, down_block_additional_residuals=tuple(skips), mid_block_additional_residual=mid
    )
    assert torch.allclose(twin, call["cond_denoised"], rtol=0, atol=1e-3)


def test_t2i_style_input_residuals_are_resized_too(tiny, caplog):
    controlled = _with_control(tiny.positive, with_inputs=True)
    with caplog.at_level(logging.WARNING):
        out = sample(_patch(tiny.model, t1=1.0, t2=1.0), controlled, tiny.negative, steps=2, size=PARITY_SIZE)
    assert torch.isfinite(out).all() and "could not be applied" not in caplog.text


def _steps_with_rad(tiny, model, steps: int) -> list[int]:
    """Indices of the steps in which the RAD level got the subsampled features."""
    widths = []

    def record(h, transformer_options):
        if tuple(transformer_options["block"]) == ("input", 2):
            widths.append(h.shape[-1])
        return h

    model = model.clone()
    model.set_model_input_block_patch_after_skip(record)  # runs after the node's own patch
    _run(tiny, model, steps=steps)
    assert len(widths) == steps  # cond and uncond run as one batch: one call per step
    return [step for step, width in enumerate(widths) if width == LATENT_SIZE // 2]


def test_t1_counts_steps_from_the_run_schedule_or_from_sigmas(tiny):
    import comfy.samplers

    patched = _patch(tiny.model, t1=0.45, t2=0.0)
    if not tiny.comfyui.modern:
        # March 2024, without the run's sigmas: the step's denoising percent (normal schedule: i / 9) below 0.45
        assert _steps_with_rad(tiny, patched, 10) == [0, 1, 2, 3, 4]
        patched.model_options["transformer_options"]["sample_sigmas"] = comfy.samplers.calculate_sigmas_scheduler(
            tiny.model.model, "normal", 10
        )
    # with the run's sigmas (newer ComfyUI passes them in every call): the package's rule, step < floor(10 * 0.45)
    assert _steps_with_rad(tiny, patched, 10) == [0, 1, 2, 3]


@pytest.mark.parametrize("steps", [1, 2])
def test_a_short_run_keeps_its_first_step(tiny, steps):
    """floor(2 * 0.4) = 0: the package's rule would leave RAU-Net off; a ratio above 0 covers the first step."""
    assert _steps_with_rad(tiny, _patch(tiny.model, t1=0.4, t2=0.0), steps) == [0]
    assert _steps_with_rad(tiny, _patch(tiny.model, t1=0.0, t2=0.0), steps) == []


@pytest.fixture(scope="module")
def tiny_sdxl(comfyui):
    with torch.inference_mode():
        model = build_tiny_sdxl(seed=0)
    return SimpleNamespace(model=model, positive=conditioning(5, pooled=True), negative=conditioning(6, pooled=True))


@pytest.mark.parametrize(("t1", "t2", "aggressive"), [(-1.0, -1.0, "preset"), (1.0, 1.0, "off")])
def test_sdxl_raunet_matches_the_diffusers_plugin(tiny_sdxl, t1, t2, aggressive):
    """SDXL: pool and RAD both on the first attention level, T1 drives the pool; the preset is aggressive."""
    patched = _patch(tiny_sdxl.model, t1, t2, aggressive=aggressive)
    call = capture_first_call(tiny_sdxl, patched, steps=SDXL_STEPS, size=PARITY_SIZE)
    plain = capture_first_call(tiny_sdxl, tiny_sdxl.model, size=PARITY_SIZE)["cond_denoised"]
    assert (call["cond_denoised"] - plain).abs().max() > 0.5
    plugin = HiDiffusion(
        window_attn=False,
        t1=None if t1 < 0 else t1,
        t2=None if t2 < 0 else t2,
        aggressive={"preset": None, "off": False}[aggressive],
        force=True,
    )
    pixels = 8.0 * PARITY_SIZE  # ComfyUI's size conditioning defaults to the latent's size, no crop
    added = {
        "text_embeds": tiny_sdxl.positive[0][1]["pooled_output"],
        "time_ids": torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]]),
    }
    twin = diffusers_prediction(tiny_sdxl, call, plugin, twin=diffusers_twin_sdxl(), added_cond_kwargs=added)
    assert torch.allclose(twin, call["cond_denoised"], rtol=0, atol=1e-3)


def _sdxl_first_calls(tiny_sdxl, steps: int) -> tuple[dict, dict, dict]:
    """The first call under the preset, RAD alone and the pool alone, in a run of ``steps``."""
    return (
        capture_first_call(tiny_sdxl, _patch(tiny_sdxl.model), steps=steps, size=PARITY_SIZE),
        capture_first_call(
            tiny_sdxl, _patch(tiny_sdxl.model, 0.0, 1.0, aggressive="off"), steps=steps, size=PARITY_SIZE
        ),
        capture_first_call(
            tiny_sdxl, _patch(tiny_sdxl.model, 1.0, 0.0, aggressive="off"), steps=steps, size=PARITY_SIZE
        ),
    )


def test_sdxl_preset_runs_rad_alone_in_the_first_steps(tiny_sdxl):
    preset, rad_only, pool_only = _sdxl_first_calls(tiny_sdxl, SDXL_STEPS)
    assert torch.equal(preset["cond_denoised"], rad_only["cond_denoised"])
    assert (preset["cond_denoised"] - pool_only["cond_denoised"]).abs().max() > 0.5


def test_sdxl_turbo_preset_needs_the_run_schedule(tiny_sdxl, comfyui):
    """1-4 steps get the SDXL-Turbo preset (the pool in the first half, no RAD) where ComfyUI passes the run's
    sigmas; the March 2024 snapshot does not, so it keeps the aggressive preset (RAD alone first)."""
    preset, rad_only, pool_only = _sdxl_first_calls(tiny_sdxl, 2)
    expected = pool_only if comfyui.modern else rad_only
    assert torch.equal(preset["cond_denoised"], expected["cond_denoised"])
