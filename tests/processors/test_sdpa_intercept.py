"""The SDPA interception modes: editing the first call, replacing it, and the two nested either way."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnsurgery.processors import sdpa_intercept
from attnsurgery.processors.sdpa_intercept import FirstAttentionCall, ReplacedAttentionCall


def _qkv(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, 6, 4, generator=g) for _ in range(3))


def _halved_sdpa(q, k, v, call):
    """A stand-in for local attention that itself calls SDPA (as the tiles backend does)."""
    return 0.5 * F.scaled_dot_product_attention(q, k, v, scale=call["scale"])


def test_replaced_call_never_runs_the_dense_sdpa_and_counts_once():
    q, k, v = _qkv()
    seen = []
    with ReplacedAttentionCall(lambda q, k, v, call: seen.append(call) or v + 1) as mode:
        out = F.scaled_dot_product_attention(q, k, v, scale=0.3)
        second = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out, v + 1)
    assert torch.equal(second, F.scaled_dot_product_attention(q, k, v))  # later calls are left alone
    assert mode.calls == 2 and len(seen) == 1 and seen[0]["scale"] == 0.3


def _nested(edit_outer: bool) -> torch.Tensor:
    """Replacement inside an edit (edit_outer) or the edit inside the replacement; the edit doubles head 0."""

    def edit(q, k, v, out, call):
        out = out.clone()
        out[:, 0] *= 2
        return out

    q, k, v = _qkv()
    first, second = (FirstAttentionCall(edit), ReplacedAttentionCall(_halved_sdpa))
    outer, inner = (first, second) if edit_outer else (second, first)
    with outer, inner:
        out = F.scaled_dot_product_attention(q, k, v)
    assert first.calls == 1 and second.calls == 1
    return out


def test_an_edit_sees_the_replaced_attention_whichever_mode_is_entered_first():
    q, k, v = _qkv()
    expected = 0.5 * F.scaled_dot_product_attention(q, k, v)
    expected[:, 0] *= 2
    assert not torch.allclose(expected, F.scaled_dot_product_attention(q, k, v))  # both effects are real
    torch.testing.assert_close(_nested(edit_outer=True), expected)
    torch.testing.assert_close(_nested(edit_outer=False), expected)


def test_modes_leave_no_trace_after_an_exception():
    q, k, v = _qkv()

    def fail(q, k, v, call):
        raise RuntimeError("boom")

    try:
        with FirstAttentionCall(lambda q, k, v, out, call: out), ReplacedAttentionCall(fail):
            F.scaled_dot_product_attention(q, k, v)
    except RuntimeError:
        pass
    assert sdpa_intercept._active_modes() == []  # a stale mode would be edited by the next replacement
    with FirstAttentionCall(lambda q, k, v, out, call: out * 0) as mode:  # a fresh mode works as before
        assert not F.scaled_dot_product_attention(q, k, v).any()
    assert mode.calls == 1
