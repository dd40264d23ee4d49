"""Merged joint attention against its plainly correct float64 form: every image token attends with (and, in
qkv, as) the mean of its merge slot, text untouched. The log(size) bias makes the two equal exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnsurgery.ops.token_merge import match_tokens, plan_merge
from attnsurgery.processors.joint_merge import merged_joint_attention
from attnsurgery.processors.joint_replace import join_tokens, split_tokens

GRID, TEXT, HEADS, DIM = (4, 6), 5, 3, 8


def _qkv(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    n = TEXT + GRID[0] * GRID[1]
    return tuple(torch.randn(2, HEADS, n, DIM, generator=g, dtype=torch.float64) for _ in range(3))


def _per_token(x: torch.Tensor, plan) -> torch.Tensor:
    """Every image token replaced by the mean of its slot: ``unmerge(merge(x))`` per head."""
    b, h, n, d = x.shape
    flat = x.transpose(1, 2).reshape(b, n, h * d)
    return plan.unmerge(plan.merge(flat)).reshape(b, n, h, d).transpose(1, 2)


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("mode", ["kv", "qkv"])
def test_merged_attention_equals_attention_over_slot_means(mode, text_first):
    q, k, v = _qkv()
    _, image_k = split_tokens(k, TEXT, text_first)
    plan = plan_merge(match_tokens(image_k.mean(dim=1), *GRID, 2, 2), r=9)
    assert plan.num_out == GRID[0] * GRID[1] - 9 and plan.counts.max() > 1  # real merges happen

    def expanded(x: torch.Tensor) -> torch.Tensor:
        text, image = split_tokens(x, TEXT, text_first)
        return join_tokens(text, _per_token(image, plan), text_first)

    queries = expanded(q) if mode == "qkv" else q
    expected = F.scaled_dot_product_attention(queries, expanded(k), expanded(v))
    got = merged_joint_attention(q, k, v, plan, num_text=TEXT, text_first=text_first, mode=mode, scale=DIM**-0.5)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    dense = F.scaled_dot_product_attention(q, k, v)
    assert (got - dense).abs().max() > 1e-3  # the merge changes the result: the check above can fail


def test_merging_equal_tokens_changes_nothing():
    """Image tokens in identical pairs, merged pair by pair: kv attention equals dense attention (text rows
    included), which only holds with the log(size) bias on each merged key."""
    q, k, v = _qkv(1)
    rows, cols = GRID
    for x in (k, v):
        image = x[:, :, TEXT:].reshape(2, HEADS, rows, cols, DIM)
        image[..., 1::2, :] = image[..., 0::2, :]  # each dst (cell position 0 of 1x2 cells) has one twin
    plan = plan_merge(match_tokens(k[:, :, TEXT:].mean(dim=1), rows, cols, 2, 1), r=rows * cols // 2)
    assert plan.num_out == rows * cols // 2
    got = merged_joint_attention(q, k, v, plan, num_text=TEXT, text_first=True, mode="kv", scale=DIM**-0.5)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), rtol=1e-12, atol=1e-12)
