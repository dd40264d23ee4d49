"""PerturbedAttention on tiny pipelines: exactness, head addressing, modes, families, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
)
from diffusers.models.attention_processor import AttnProcessor

import attnsurgery as surg
from attnsurgery import PerturbedAttention
from attnsurgery.perturbation.guidance import GuidanceSchedule
from attnsurgery.perturbation.processor import HeadPerturbationProcessor, PerturbationState
from attnsurgery.testing.tiny import tiny_flux, tiny_sd3, tiny_sd15, tiny_sd35

MID = "mid_block.attentions.0.transformer_blocks.0.attn1"
SD3_SIZE = dict(height=128, width=128, max_sequence_length=16)


def _latents(pipe, steps: int = 2, prompt: str = "a red cube", **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, generator=generator, output_type="latent", num_inference_steps=steps, **kwargs).images


def _pipe(factory, **kwargs):
    pipe = factory(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd15():
    return _pipe(tiny_sd15)


@pytest.fixture(scope="module")
def sd3():
    return _pipe(tiny_sd3, num_layers=4)


@pytest.fixture(scope="module")
def flux():
    return _pipe(tiny_flux)


def _with(pipe, plugin, **kwargs) -> torch.Tensor:
    with surg.patched(pipe, plugin):
        return _latents(pipe, **kwargs)


# --------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize(
    "plugin",
    [PerturbedAttention(scale=0.0), PerturbedAttention(soft=0.0), PerturbedAttention(start=0.6, stop=1.0)],
    ids=["scale0", "soft0", "window"],
)
def test_zero_strength_is_bit_identical_to_no_plugin(sd3, plugin):
    """The window holds no step of a 2-step run (progress 0 and 0.5)."""
    plain = _latents(sd3, guidance_scale=4.0, **SD3_SIZE)
    assert not torch.equal(_with(sd3, PerturbedAttention(), guidance_scale=4.0, **SD3_SIZE), plain)
    assert torch.equal(_with(sd3, plugin, guidance_scale=4.0, **SD3_SIZE), plain)


def test_all_heads_of_a_layer_equal_the_layer(sd3):
    path = "transformer_blocks.1.attn"
    layer = _with(sd3, PerturbedAttention(layers=path), guidance_scale=4.0, **SD3_SIZE)
    heads = _with(sd3, PerturbedAttention(heads=[f"{path}:{h}" for h in range(4)]), guidance_scale=4.0, **SD3_SIZE)
    blocks = _with(sd3, PerturbedAttention(heads=[(1, h) for h in range(4)]), guidance_scale=4.0, **SD3_SIZE)
    assert not torch.equal(layer, _latents(sd3, guidance_scale=4.0, **SD3_SIZE))
    assert torch.equal(heads, layer) and torch.equal(blocks, layer)
    one_head = _with(sd3, PerturbedAttention(heads=f"{path}:2"), guidance_scale=4.0, **SD3_SIZE)
    assert not torch.equal(one_head, layer)


def test_soft_interpolates_between_plain_and_full(sd3):
    plain = _latents(sd3, guidance_scale=4.0, **SD3_SIZE)
    full = _with(sd3, PerturbedAttention(soft=1.0), guidance_scale=4.0, **SD3_SIZE)
    half = _with(sd3, PerturbedAttention(soft=0.5), guidance_scale=4.0, **SD3_SIZE)
    assert 0 < (half - plain).abs().max() < (full - plain).abs().max()


def test_unperturbed_rows_and_unselected_heads_are_untouched(sd15):
    """At the processor: row 2 perturbed on heads 1 and 3; rows 0-1 and heads 0, 2 bit-identical."""
    attn = sd15.unet.get_submodule(MID)
    state = PerturbationState()
    processor = HeadPerturbationProcessor(attn.processor, MID, state)
    captured = []
    hook = attn.to_out[0].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    x = torch.randn(3, 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    try:
        processor(attn, x)
        state.activate(range(2, 3), {MID: torch.tensor([[0.0, 1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0]])}, None)
        processor(attn, x)
    finally:
        hook.remove()
    plain, perturbed = (t.unflatten(-1, (attn.heads, -1)) for t in captured)  # [batch, tokens, heads, dim]
    assert torch.equal(perturbed[:2], plain[:2])
    assert torch.equal(perturbed[2, :, [0, 2, 4, 5, 6, 7]], plain[2, :, [0, 2, 4, 5, 6, 7]])
    assert not torch.equal(perturbed[2, :, 1], plain[2, :, 1]) and not torch.equal(perturbed[2, :, 3], plain[2, :, 3])


class _OwnAttention(AttnProcessor):
    """A processor of the user's that computes attention itself (no SDPA call), unknown to attnsurgery."""


def test_a_processor_without_sdpa_fails_loudly(sd15):
    attn = sd15.unet.get_submodule(MID)
    state = PerturbationState()
    state.activate(range(1), {MID: torch.ones(1, attn.heads)}, None)
    x = torch.randn(1, 16, attn.to_q.in_features)
    with pytest.raises(RuntimeError, match=r"AttnProcessor \(the pre-SDPA processor.*set_attn_processor"):
        HeadPerturbationProcessor(AttnProcessor(), MID, state)(attn, x)
    with pytest.raises(RuntimeError, match="_OwnAttention made no torch scaled_dot_product_attention call"):
        HeadPerturbationProcessor(_OwnAttention(), MID, state)(attn, x)


# --------------------------------------------------------------------------------------------- modes
def test_batched_equals_sequential_sd15(sd15):
    """192 px: the mid block holds 3 x 3 tokens."""
    kwargs = dict(height=192, width=192, guidance_scale=4.0)
    batched = _with(sd15, PerturbedAttention(heads=[f"{MID}:1", f"{MID}:5"]), **kwargs)
    sequential = _with(sd15, PerturbedAttention(heads=[f"{MID}:1", f"{MID}:5"], mode="sequential"), **kwargs)
    assert (batched - _latents(sd15, **kwargs)).abs().max() > 1e-3
    torch.testing.assert_close(sequential, batched, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------- families
def test_flux_term_is_the_same_with_true_cfg_and_without(flux):
    """One flow-matching step is linear in the prediction: s (eps_c - eps_p) must appear unscaled by
    true_cfg_scale, i.e. the separate unconditional call gets the same shift as the conditional one."""
    size = dict(height=128, width=128, max_sequence_length=16, steps=1)
    true_cfg = dict(size, negative_prompt="blurry", true_cfg_scale=3.0)
    for mode in ("batched", "sequential"):
        plugin = PerturbedAttention(scale=2.0, mode=mode)
        term_plain = _with(flux, plugin, **size) - _latents(flux, **size)
        term_cfg = _with(flux, plugin, **true_cfg) - _latents(flux, **true_cfg)
        assert term_plain.abs().max() > 1e-2
        torch.testing.assert_close(term_cfg, term_plain, atol=1e-5, rtol=1e-4)


def test_runs_with_new_prompts_do_not_reuse_a_stored_shift(flux):
    """One-step runs from the same seed start from equal latents: only the same tensor object marks a
    further call at the same step, so the second prompt gets its own perturbed prediction."""
    size = dict(height=128, width=128, max_sequence_length=16, steps=1)
    with surg.patched(flux, PerturbedAttention()):
        _latents(flux, prompt="a red cube", **size)
        second = _latents(flux, prompt="a blue ball", **size)
    alone = _with(flux, PerturbedAttention(), prompt="a blue ball", **size)
    assert torch.equal(second, alone)


def test_flux_image_only_on_double_and_single_blocks(flux):
    """FLUX orders text first; single blocks see one concatenated sequence (image range from the latent grid)."""
    size = dict(height=128, width=128, max_sequence_length=16, steps=1)
    plain = _latents(flux, **size)
    full = _with(flux, PerturbedAttention(layers="all"), **size)
    image_only = _with(flux, PerturbedAttention(layers="all", joint="image_only"), **size)
    assert (image_only - plain).abs().max() > 1e-3 and (image_only - full).abs().max() > 1e-3
    assert torch.isfinite(image_only).all()


def test_flux_guidance_distilled_runs_and_scale_is_linear():
    pipe = _pipe(tiny_flux, guidance_embeds=True)
    size = dict(height=128, width=128, max_sequence_length=16, steps=1, guidance_scale=3.5)
    plain = _latents(pipe, **size)
    one, two = (_with(pipe, PerturbedAttention(scale=s), **size) - plain for s in (1.0, 2.0))
    assert one.abs().max() > 1e-2
    torch.testing.assert_close(two, 2 * one, atol=1e-5, rtol=1e-4)


def test_sd35_qk_norm_and_dual_attention():
    """Block 1 of the tiny SD3.5 has qk_norm and an image-only attn2: both layers are wrapped."""
    pipe = _pipe(tiny_sd35)
    kwargs = dict(SD3_SIZE, guidance_scale=4.0, steps=1)
    plain = _latents(pipe, **kwargs)
    with surg.patched(pipe, PerturbedAttention(scale=2.0)) as handle:
        assert {"transformer_blocks.1.attn", "transformer_blocks.1.attn2"} <= set(handle.sites)
        two = _latents(pipe, **kwargs) - plain
    four = _with(pipe, PerturbedAttention(scale=4.0), **kwargs) - plain
    assert two.abs().max() > 1e-2
    torch.testing.assert_close(four, 2 * two, atol=1e-5, rtol=1e-4)
    assert torch.equal(_with(pipe, PerturbedAttention(scale=0.0), **kwargs), plain)


@pytest.mark.parametrize("kind", ["uniform", "mean_query", "temperature"])
def test_other_kinds_run_on_joint_attention(sd3, kind):
    plugin = PerturbedAttention(kind=kind, temperature=3.0 if kind == "temperature" else None)
    plain = _latents(sd3, guidance_scale=4.0, **SD3_SIZE)
    identity = _with(sd3, PerturbedAttention(), guidance_scale=4.0, **SD3_SIZE)
    ours = _with(sd3, plugin, guidance_scale=4.0, **SD3_SIZE)
    assert torch.isfinite(ours).all()
    assert (ours - plain).abs().max() > 1e-3 and (ours - identity).abs().max() > 1e-3


def _sd15_variant(name: str, sd15):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    if name == "img2img":
        return StableDiffusionImg2ImgPipeline(**sd15.components), dict(image=image, strength=0.5)
    if name == "controlnet":
        controlnet = ControlNetModel.from_unet(sd15.unet, conditioning_channels=3)
        return StableDiffusionControlNetPipeline(**sd15.components, controlnet=controlnet), dict(image=image)
    inpaint = tiny_sd15(in_channels=9)
    return StableDiffusionInpaintPipeline(**inpaint.components), dict(image=image, mask_image=image[:, :1])


@pytest.mark.parametrize("variant", ["img2img", "inpaint", "controlnet"])
def test_sd15_img2img_inpaint_and_controlnet(sd15, variant):
    """The wrapper duplicates every batched input (masked latents, ControlNet residuals) for the new rows.
    A top-level layer (8 x 8 tokens at 64 px) keeps these runs small."""
    pipe, extra = _sd15_variant(variant, sd15)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(extra, height=64, width=64, guidance_scale=4.0, steps=2 if variant == "img2img" else 1)
    top = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    plain = _latents(pipe, **kwargs)
    one, two = (_with(pipe, PerturbedAttention(layers=top, scale=s), **kwargs) - plain for s in (1.0, 2.0))
    assert one.abs().max() > 1e-4
    torch.testing.assert_close(two, 2 * one, atol=1e-5, rtol=1e-4)  # one step: linear in the added term


# --------------------------------------------------------------------------------------------- config
def test_config_round_trips():
    plugin = PerturbedAttention(scale=2.0, heads=("transformer_blocks.1.attn:3", (2, 5)), soft=0.5)
    assert surg.plugin_from_dict(plugin.to_dict()) == plugin


def test_schedule_adaptive_scale_and_window():
    """diffusers' s_t = max(0, s - a (1000 - t)), and nothing outside [start, stop]."""
    schedule = GuidanceSchedule(scale=3.0, adaptive_scale=0.01, start=0.0, stop=0.5)
    assert schedule.at(0.0, 981.0) == pytest.approx(3.0 - 0.01 * 19)
    assert schedule.at(0.25, 500.0) == 0.0
    assert schedule.at(0.75, 999.0) == 0.0
    assert GuidanceSchedule(scale=3.0).at(1.0, 1.0) == 3.0


def test_remove_restores_the_processors(sd3):
    before = dict(sd3.transformer.attn_processors)
    handle = surg.apply(sd3, PerturbedAttention(layers="transformer_blocks.*"))
    assert any(isinstance(p, HeadPerturbationProcessor) for p in sd3.transformer.attn_processors.values())
    handle.remove()
    after = sd3.transformer.attn_processors
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert not sd3.transformer._forward_hooks and not sd3.transformer._forward_pre_hooks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kind="blur"), "kind='blur' is invalid"),
        (dict(kind="temperature"), "needs temperature > 0"),
        (dict(temperature=2.0), "only applies to kind='temperature'"),
        (dict(kind="uniform", joint="image_only"), "use kind='identity'"),
        (dict(soft=1.5), "soft=1.5 is invalid"),
        (dict(start=0.5, stop=0.2), "stop=0.2 is invalid"),
        (dict(mode="parallel"), "mode='parallel' is invalid"),
        (dict(layers="mid", heads="mid:0"), "not both"),
    ],
)
def test_bad_config_names_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PerturbedAttention(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(layers="down_blocks.0.attentions.0.transformer_blocks.0.attn2"), "matches no attention layer"),
        (dict(heads=f"{MID}:8"), "out of range"),
    ],
)
def test_bad_selection_names_the_problem(sd15, kwargs, message):
    with pytest.raises(ValueError, match=message):
        surg.apply(sd15, PerturbedAttention(**kwargs))
    assert not surg.active_surgeries(sd15)


# --------------------------------------------------------------------------------------------- unclear input (issue 17)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(layers=123), r"layers=123 is invalid; use a layer selector string .* or a list of them"),
        (dict(layers=["mid", 4]), r"layers=\['mid', 4\] is invalid"),
        (dict(scale=math.inf), "scale=inf is invalid"),
        (dict(heads=[(True, 1)]), r"heads item \(True, 1\) is invalid"),
        (dict(heads=7), "heads=7 is invalid"),
        (dict(heads="heads.json"), r"heads='heads.json' names a file: pass it as a Path, heads=Path\('heads.json'\)"),
    ],
    ids=["layers-int", "layers-list-int", "scale-inf", "heads-bool", "heads-int", "heads-json-str"],
)
def test_unclear_config_is_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PerturbedAttention(**kwargs)


def test_two_perturbation_plugins_are_told_to_use_one(sd15):
    """They chose different layers: the fix is one plugin over both, not "different layers"."""
    with pytest.raises(ValueError, match=r"one PerturbedAttention\(layers=\[...\]\)"):
        surg.apply(sd15, PerturbedAttention(layers="mid"), PerturbedAttention(layers="top"))
    assert not surg.active_surgeries(sd15)


def test_image_only_on_a_unet_is_refused(sd15):
    with pytest.raises(ValueError, match="joint='image_only'.*no selected layer sees text tokens"):
        surg.apply(sd15, PerturbedAttention(joint="image_only"))
    assert not surg.active_surgeries(sd15)


def test_attention_slicing_is_named_at_apply():
    """SlicedAttnProcessor computes attention with baddbmm: no SDPA call to perturb. Say so at apply."""
    pipe = _pipe(tiny_sd15)
    pipe.enable_attention_slicing()
    message = r"SlicedAttnProcessor \(attention slicing\).*disable_attention_slicing"
    with pytest.raises(NotImplementedError, match=message):
        surg.apply(pipe, PerturbedAttention())
    assert not surg.active_surgeries(pipe)
    pipe.disable_attention_slicing()
    surg.apply(pipe, PerturbedAttention()).remove()
