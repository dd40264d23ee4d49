"""The documented workflows (README, docs/comfyui.md) name registered nodes with their inputs, and their nodes run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import attnsurgery.comfy as pack
from tests.support.comfy.tiny_comfy import sample

DOCUMENTS = ("README.md", "docs/comfyui.md")


def _docs_workflow(document: str) -> dict:
    text = (Path(__file__).parents[2] / document).read_text()
    return json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1))


@pytest.mark.parametrize("document", DOCUMENTS)
def test_documented_workflow_uses_registered_nodes_with_their_inputs(comfyui, document):
    registry = comfyui.nodes.NODE_CLASS_MAPPINGS
    registry.update(pack.NODE_CLASS_MAPPINGS)
    workflow = _docs_workflow(document)
    used = {node["class_type"] for node in workflow.values()}
    assert len(used & set(pack.NODE_CLASS_MAPPINGS)) >= 2
    for node_id, node in workflow.items():
        required = registry[node["class_type"]].INPUT_TYPES()["required"]
        assert set(node["inputs"]) >= set(required), (node_id, set(required) - set(node["inputs"]))
        for name, value in node["inputs"].items():
            if isinstance(value, list):  # a link: [source node id, output index]
                assert value[0] in workflow
            elif node["class_type"] in pack.NODE_CLASS_MAPPINGS and isinstance(required[name][0], list):
                assert value in required[name][0], (node_id, name, value)  # a choice


@pytest.mark.parametrize("document", DOCUMENTS)
def test_documented_workflow_runs_on_the_tiny_model(tiny, document):
    """The workflow's attnsurgery nodes, fed the tiny model in place of the checkpoint, sample and guide."""
    workflow = _docs_workflow(document)
    outputs = {"1": (tiny.model,)}

    def evaluate(node_id: str):
        if node_id not in outputs:
            node = workflow[node_id]
            cls = pack.NODE_CLASS_MAPPINGS[node["class_type"]]
            inputs = {
                name: evaluate(value[0])[value[1]] if isinstance(value, list) else value
                for name, value in node["inputs"].items()
            }
            outputs[node_id] = getattr(cls(), cls.FUNCTION)(**inputs)
        return outputs[node_id]

    model = evaluate(workflow["7"]["inputs"]["model"][0])[0]
    result = sample(model, tiny.positive, tiny.negative)
    assert torch.isfinite(result).all() and (result - tiny.baseline).abs().max() > 1e-3
    assert torch.equal(sample(tiny.model, tiny.positive, tiny.negative), tiny.baseline)
