"""The agent-attention node in the real ComfyUI: effect, untouched input model, no-op schedule, parity, errors."""

from __future__ import annotations

import json

import pytest
import torch

from attnsurgery.comfy.agent_attention import DEFAULT_SCHEDULE, AttnSurgeryAgentAttention
from attnsurgery.plugins.agent import AgentAttention
from tests.support.comfy.parity import capture_first_call, diffusers_prediction
from tests.support.comfy.tiny_comfy import sample

NO_MERGE = json.dumps([{"until": 1.0, "sx": 2, "sy": 2, "ratio": 0.0, "agent_ratio": 0.0}])


def _patch(model, layers="top", schedule=DEFAULT_SCHEDULE, source="tome", k_scale2=0.3, k_shortcut=0.075, seed=0):
    return AttnSurgeryAgentAttention().patch(model, layers, schedule, source, k_scale2, k_shortcut, seed)[0]


def _run(tiny, model):
    return sample(model, tiny.positive, tiny.negative)


def test_agents_change_the_sample_and_leave_the_input_model_alone(tiny):
    tome = _run(tiny, _patch(tiny.model))
    pool = _run(tiny, _patch(tiny.model, source="pool"))
    assert torch.isfinite(tome).all() and torch.isfinite(pool).all()
    assert (tome - tiny.baseline).abs().max() > 1e-3
    assert (pool - tome).abs().max() > 1e-3
    assert torch.equal(_run(tiny, tiny.model), tiny.baseline)
    assert "patches_replace" not in tiny.model.model_options["transformer_options"]


def test_schedule_without_merging_is_plain_attention(tiny):
    assert torch.allclose(_run(tiny, _patch(tiny.model, schedule=NO_MERGE)), tiny.baseline, atol=1e-4)


def test_pooled_agents_match_the_diffusers_plugin(tiny):
    call = capture_first_call(tiny, _patch(tiny.model, source="pool"))
    plain = capture_first_call(tiny, tiny.model)["cond_denoised"]
    assert (call["cond_denoised"] - plain).abs().max() > 0.05  # agents change the prediction at this step
    agents = diffusers_prediction(tiny, call, AgentAttention(agent_source="pool"))
    assert torch.allclose(agents, call["cond_denoised"], rtol=0, atol=1e-3)


def test_bad_input_names_the_problem(tiny):
    with pytest.raises(ValueError, match="JSON list of phases"):
        _patch(tiny.model, schedule="[{until: 1}]")
    with pytest.raises(ValueError, match="until"):
        _patch(tiny.model, schedule='[{"until": 1.5, "sx": 2, "sy": 2, "ratio": 0.4, "agent_ratio": 0.5}]')
    with pytest.raises(ValueError, match="matches no self-attention layer"):
        _patch(tiny.model, layers="mid_blok")


def test_token_changing_nodes_refuse_to_share_a_layer(tiny):
    from attnsurgery.comfy.token_merging import AttnSurgeryTokenMerging

    merged = AttnSurgeryTokenMerging().patch(tiny.model, 0.5, 2, 2, "down_blocks.0", 0)[0]
    with pytest.raises(ValueError, match="both change the tokens"):
        _patch(merged, layers="top")
    both = _patch(merged, layers="up_blocks.3")  # different layers stack
    assert (_run(tiny, both) - _run(tiny, merged)).abs().max() > 1e-3
