"""Agent attention inside a joint call, against the maths written out with explicit softmaxes in float64."""

from __future__ import annotations

import pytest
import torch

from attnsurgery.ops.agent import pool_agents
from attnsurgery.ops.token_merge import match_tokens, plan_merge
from attnsurgery.processors.joint_agent import agent_joint_attention
from attnsurgery.processors.joint_replace import join_tokens, split_tokens

GRID, TEXT, HEADS, DIM = (4, 8), 6, 2, 8
K_SCALE2, K_SHORTCUT = 0.3, 0.075


def _qkv() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    return tuple(
        torch.randn(2, HEADS, TEXT + GRID[0] * GRID[1], DIM, generator=g, dtype=torch.float64) for _ in range(3)
    )


def merged_tokens(x: torch.Tensor, plan) -> torch.Tensor:
    """The plainly correct merge of ``[B, H, P, D]`` tokens: ToMe's scatter over the flattened heads."""
    b, h, p, d = x.shape
    return plan.merge(x.transpose(1, 2).reshape(b, p, h * d)).reshape(b, -1, h, d).transpose(1, 2)


def unmerged_tokens(x: torch.Tensor, plan) -> torch.Tensor:
    b, h, m, d = x.shape
    return plan.unmerge(x.transpose(1, 2).reshape(b, m, h * d)).reshape(b, -1, h, d).transpose(1, 2)


def _softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    weights = (logits - logits.amax(-1, keepdim=True)).exp()
    return weights / weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("source", ["tome", "pool"])
def test_agent_attention_matches_the_written_out_maths(text_first, source):
    q, k, v = _qkv()
    s = DIM**-0.5
    (tq, iq), (tk, ik), (tv, iv) = (split_tokens(x, TEXT, text_first) for x in (q, k, v))
    match = match_tokens(ik.mean(dim=1), *GRID, 2, 2)
    if source == "pool":
        plan, agents = plan_merge(match, 0), pool_agents(iq, *GRID, 2, 2)
    else:
        plan, agents = plan_merge(match, 8), merged_tokens(iq, plan_merge(match, 20))
    sizes = plan.counts[:, None, None, :, 0].double()
    mq, mk, mv = (merged_tokens(x, plan) for x in (iq, ik, iv))
    # step 1: agents over [text keys, merged keys], each merged key weighted by its size
    gather = _softmax_rows(torch.cat((agents @ tk.mT * s, agents @ mk.mT * s + sizes.log()), -1))
    agent_values = gather @ torch.cat((tv, mv), 2)
    # step 2: merged image queries over [agents at s**k_scale2, text keys at s]
    read = _softmax_rows(torch.cat((mq @ agents.mT * s**K_SCALE2, mq @ tk.mT * s), -1))
    image_out = unmerged_tokens(read @ torch.cat((agent_values, tv), 2) + K_SHORTCUT * mv, plan)
    text_out = _softmax_rows(tq @ k.mT * s) @ v
    expected = join_tokens(text_out, image_out, text_first)
    unmerged = None if source == "pool" else plan  # the pool source runs without a plan; r = 0 above is the same maths
    got = agent_joint_attention(
        q,
        k,
        v,
        unmerged,
        agents,
        num_text=TEXT,
        text_first=text_first,
        scale=s,
        k_scale2=K_SCALE2,
        k_shortcut=K_SHORTCUT,
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    dense = _softmax_rows(q @ k.mT * s) @ v
    assert (got - dense).abs().max() > 1e-2  # agents change the result: the comparison above can fail
    torch.testing.assert_close(split_tokens(got, TEXT, text_first)[0], text_out)  # text queries stay dense
