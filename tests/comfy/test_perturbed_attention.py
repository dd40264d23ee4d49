"""The perturbed-attention node in the real ComfyUI: effect, untouched input model, no-op settings, errors."""

from __future__ import annotations

import pytest
import torch

from attnsurgery.comfy.perturbed_attention import AttnSurgeryPerturbedAttention
from attnsurgery.headhunter import HeadSet
from tests.support.comfy.tiny_comfy import sample

UP_HEADS = "up_blocks.1.attentions.0:0,3"


def _patch(model, scale=3.0, heads="mid_block", soft=1.0, kind="identity", temperature=2.0, start=0.0, end=1.0):
    return AttnSurgeryPerturbedAttention().patch(model, scale, heads, soft, kind, temperature, start, end)[0]


def _run(tiny, model):
    return sample(model, tiny.positive, tiny.negative)


def test_guidance_changes_the_sample_and_leaves_the_input_model_alone(tiny):
    patched = _patch(tiny.model)
    guided = _run(tiny, patched)
    assert torch.isfinite(guided).all()
    assert (guided - tiny.baseline).abs().max() > 1e-3
    assert torch.equal(_run(tiny, tiny.model), tiny.baseline)
    assert "sampler_post_cfg_function" not in tiny.model.model_options
    assert "patches_replace" not in patched.model_options["transformer_options"]  # per call, on a copy


@pytest.mark.parametrize("setting", [{"scale": 0.0}, {"soft": 0.0}, {"start": 0.2, "end": 0.2}])
def test_zero_strength_is_bit_identical(tiny, setting):
    assert torch.equal(_run(tiny, _patch(tiny.model, **setting)), tiny.baseline)


def test_single_heads_differ_from_whole_layers(tiny):
    heads = _run(tiny, _patch(tiny.model, heads=UP_HEADS))
    layer = _run(tiny, _patch(tiny.model, heads="up_blocks.1.attentions.0"))
    assert (heads - tiny.baseline).abs().max() > 1e-4
    assert (heads - layer).abs().max() > 1e-4
    as_json = _run(tiny, _patch(tiny.model, heads='{"up_blocks.1.attentions.0.transformer_blocks.0.attn1": [0, 3]}'))
    assert torch.equal(as_json, heads)


def test_a_head_set_file_from_the_search_is_accepted(tiny, tmp_path):
    """`attnsurgery hunt --out` files, by path or pasted, select the same heads as the text spec."""
    layer = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    head_set = HeadSet((f"{layer}:0", f"{layer}:3"), {"family": "sd15"})
    path = head_set.save(tmp_path / "heads.json")
    heads = _run(tiny, _patch(tiny.model, heads=UP_HEADS))
    assert (heads - tiny.baseline).abs().max() > 1e-4
    assert torch.equal(_run(tiny, _patch(tiny.model, heads=str(path))), heads)
    assert torch.equal(_run(tiny, _patch(tiny.model, heads=path.read_text())), heads)


@pytest.mark.parametrize("kind", ["uniform", "mean_query", "temperature"])
def test_other_kinds_guide_differently(tiny, kind):
    identity = _run(tiny, _patch(tiny.model, heads=UP_HEADS))
    other = _run(tiny, _patch(tiny.model, heads=UP_HEADS, kind=kind))
    assert (other - identity).abs().max() > 1e-4


def test_bad_input_names_the_problem(tiny):
    with pytest.raises(ValueError, match="matches no self-attention layer"):
        _patch(tiny.model, heads="mid_blok")
    with pytest.raises(ValueError, match="heads 0..7"):
        _patch(tiny.model, heads="mid_block:8")
    with pytest.raises(ValueError, match="soft"):
        _patch(tiny.model, soft=1.5)
    # models that are neither U-Nets nor FLUX/SD3: tests/comfy/test_dit_nodes.py


def test_percent_window_limits_the_guidance(tiny):
    full = _run(tiny, _patch(tiny.model))
    early = _run(tiny, _patch(tiny.model, end=0.4))
    assert (early - tiny.baseline).abs().max() > 1e-4
    assert (early - full).abs().max() > 1e-4


def test_cfg_1_runs_no_unconditional_pass(tiny):
    """The guidance needs the conditional prediction alone: at CFG 1, one cond pass and one perturbed pass."""
    rows = []

    def counting(apply_model, args):
        rows.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    guided = _patch(tiny.model)
    guided.set_model_unet_function_wrapper(counting)
    sample(guided, tiny.positive, tiny.negative, steps=1, cfg=1.0)
    assert sum(rows) == 2
