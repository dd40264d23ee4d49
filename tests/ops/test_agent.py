"""Agent attention ops against explicit float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch

from attnsurgery.ops.agent import agent_attention, agents_pay_off, merge_counts, pool_agents
from attnsurgery.ops.token_merge import match_tokens, plan_merge


def reference_agent_attention(q, k, v, a, k_scale2=0.3, k_shortcut=0.075):
    """The AgentSD formula with explicit attention maps."""
    s = q.shape[-1] ** -0.5
    agent_values = torch.softmax(a @ k.transpose(-1, -2) * s, dim=-1) @ v
    return torch.softmax(q @ a.transpose(-1, -2) * s**k_scale2, dim=-1) @ agent_values + k_shortcut * v


def test_agent_attention_matches_formula():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    agents = torch.randn(2, 3, 6, 8, generator=gen, dtype=torch.float64)
    out = agent_attention(q, k, v, agents)
    torch.testing.assert_close(out, reference_agent_attention(q, k, v, agents))
    other = agent_attention(q, k, v, agents, k_scale2=1.0, k_shortcut=0.0)
    assert not torch.allclose(out, other)  # the constants matter
    torch.testing.assert_close(other, reference_agent_attention(q, k, v, agents, 1.0, 0.0))


def test_fp32_compute_for_half_inputs():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    agents = q[:, :, ::8]
    want = reference_agent_attention(q, k, v, agents)
    out = agent_attention(*(t.bfloat16() for t in (q, k, v, agents)), compute_dtype=torch.float32)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want, atol=3e-2, rtol=3e-2)


def test_merge_counts_and_the_agent_rule_at_512px():
    # SD1.5 top level at 512 px: 64 x 64 = 4096 tokens.
    r, agent_r = merge_counts(4096, 4096 - 256, 0.4, 0.95)  # phase 1: 4x4 cells
    assert (4096 - r, 4096 - agent_r) == (2458, 256)
    assert agents_pay_off(4096, r, agent_r)
    r, agent_r = merge_counts(4096, 4096 - 1024, 0.4, 0.5)  # phase 2: 2x2 cells
    assert not agents_pay_off(4096, r, agent_r)
    assert agents_pay_off(100, 0, 51) and not agents_pay_off(100, 0, 50)  # strict inequality


def test_agents_at_ratio_095_are_exactly_the_dst_clusters():
    gen = torch.Generator().manual_seed(2)
    h, w = 8, 12
    metric = torch.randn(2, h * w, 6, generator=gen, dtype=torch.float64)
    x = torch.randn(2, h * w, 5, generator=gen, dtype=torch.float64)
    match = match_tokens(metric, h, w, 4, 4)
    _, agent_r = merge_counts(h * w, match.num_src, 0.4, 0.95)
    agents = plan_merge(match, agent_r).merge(x)
    assert agents.shape[1] == (h // 4) * (w // 4)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    for b in range(2):
        best = (unit[b, match.src_pos] @ unit[b, match.dst_pos].T).argmax(-1)
        for j, d in enumerate(match.dst_pos.tolist()):
            members = [d] + match.src_pos[best == j].tolist()
            torch.testing.assert_close(agents[b, j], x[b, members].mean(0))


@pytest.mark.parametrize("h,w,sx,sy", [(8, 8, 4, 4), (6, 10, 4, 4), (5, 7, 2, 2)])
def test_pool_agents_average_each_cell(h, w, sx, sy):
    q = torch.randn(2, 3, h * w, 4, dtype=torch.float64)
    agents = pool_agents(q, h, w, sx, sy)
    grid = q.reshape(2, 3, h, w, 4)
    want = [grid[:, :, y : y + sy, x : x + sx].mean(dim=(2, 3)) for y in range(0, h, sy) for x in range(0, w, sx)]
    assert agents.shape[2] == math.ceil(h / sy) * math.ceil(w / sx)
    assert agents.is_contiguous()  # else SDPA falls back to a kernel that builds the full map
    torch.testing.assert_close(agents, torch.stack(want, dim=2))


def test_cross_attention_is_rejected():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match="self-attention"):
        agent_attention(q, torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4), q[:, :, :2])
