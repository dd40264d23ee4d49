"""AgentAttention on every DiT family: agents inside the joint attention call, text keys global."""

from __future__ import annotations

import pytest
import torch

import attnsurgery as surg
from attnsurgery import AgentAttention, AgentPhase, PerturbedAttention
from attnsurgery.testing import restore
from tests.support.dit_families import FAMILIES, build, latents

AGENTS_ONLY = (AgentPhase(until=1.0, sx=4, sy=4, ratio=0.4, agent_ratio=0.95),)
NOTHING = (AgentPhase(until=1.0, sx=2, sy=2, ratio=0.0, agent_ratio=0.0),)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_pipe(request):
    return request.param, build(request.param)


def _with(pipe, name, *plugins) -> torch.Tensor:
    with surg.patched(pipe, *plugins):
        return latents(pipe, name)


@pytest.mark.parametrize("source", ["tome", "pool"])
def test_every_family_changes_and_restores_exactly(family_pipe, source):
    """The published schedule: agents in step 0 (4x4 cells), ToMe in step 1 (progress 0.5, 2x2 cells)."""
    name, pipe = family_pipe
    plain = latents(pipe, name)  # first: libraries add attributes lazily on a first call
    before = restore.snapshot(pipe)
    for plugin in (AgentAttention(agent_source=source), AgentAttention(schedule=AGENTS_ONLY, agent_source=source)):
        out = _with(pipe, name, plugin)
        assert (out - plain).abs().max() > 1e-4 * plain.abs().max()
    restore.assert_restored(pipe, before)
    assert torch.equal(latents(pipe, name), plain)
    assert torch.equal(_with(pipe, name, AgentAttention(schedule=NOTHING)), plain)  # nothing to do: untouched


def test_composes_with_head_level_perturbation():
    pipe = build("flux")
    agents = AgentAttention(schedule=AGENTS_ONLY)
    pag = PerturbedAttention(scale=3.0, heads=["transformer_blocks.0.attn:0"])
    both = _with(pipe, "flux", agents, pag)
    assert not torch.equal(both, _with(pipe, "flux", agents))
    assert not torch.equal(both, _with(pipe, "flux", pag))
