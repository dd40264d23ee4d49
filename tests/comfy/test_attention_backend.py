"""Where a node computes attention itself it goes through ComfyUI's function: the user's backend and overrides."""

from __future__ import annotations

import functools
import json

import pytest

from attnsurgery.comfy.agent_attention import AttnSurgeryAgentAttention
from attnsurgery.comfy.perturbed_attention import AttnSurgeryPerturbedAttention
from tests.support.comfy.tiny_comfy import LATENT_SIZE, sample

MID = (4, 4)  # (queries, keys) of the middle block's self-attention on the 16x16 latent; no other layer has 4
TOP = (LATENT_SIZE**2, LATENT_SIZE**2)
NO_MERGE = json.dumps([{"until": 1.0, "sx": 2, "sy": 2, "ratio": 0.0, "agent_ratio": 0.0}])


def _guided(model):
    return AttnSurgeryPerturbedAttention().patch(model, 3.0, "mid_block", 1.0, "identity", 2.0, 0.0, 1.0)[0]


def _calls(tiny, model, record: list) -> list[tuple[int, int]]:
    """(queries, keys) of every attention call of a one-step run."""
    record.clear()
    sample(model, tiny.positive, tiny.negative, steps=1)
    return list(record)


@pytest.fixture
def backend(comfyui, monkeypatch):
    """ComfyUI's attention function, swapped for one that records its calls (as a launch flag picks one)."""
    import comfy.ldm.modules.attention as attention

    record, original = [], attention.optimized_attention

    @functools.wraps(original)  # the same signature: the nodes pass what this ComfyUI's function takes
    def recording(q, k, v, *args, **kwargs):
        record.append((q.shape[1], k.shape[1]))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention, "optimized_attention", recording)
    return record


def test_perturbed_attention_runs_the_users_attention_function(tiny, backend):
    plain = _calls(tiny, tiny.model, backend).count(MID)
    assert plain == 1  # one batched cond/uncond pass
    assert _calls(tiny, _guided(tiny.model), backend).count(MID) == plain + 1  # and the perturbed pass


def test_agent_attention_runs_the_users_attention_function_where_it_is_plain(tiny, backend):
    plain = _calls(tiny, tiny.model, backend).count(TOP)
    assert plain > 0
    unmerged = AttnSurgeryAgentAttention().patch(tiny.model, "top", NO_MERGE, "tome", 0.3, 0.075, 0)[0]
    assert _calls(tiny, unmerged, backend).count(TOP) == plain


def test_an_attention_override_in_the_options_is_honoured(tiny, comfyui):
    """Newer ComfyUI: ``optimized_attention_override`` in transformer_options (set by other custom nodes)."""
    if not comfyui.modern:
        pytest.skip("ComfyUI 2024.03 has no optimized_attention_override")
    record = []

    def override(function, q, k, v, *args, **kwargs):
        record.append((q.shape[1], k.shape[1]))
        return function(q, k, v, *args, **kwargs)

    guided = _guided(tiny.model)
    guided.model_options["transformer_options"]["optimized_attention_override"] = override
    assert _calls(tiny, guided, record).count(MID) == 2
