"""AgentAttention: the processor against an explicit float64 composition, the schedule, batches, removal."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import attnsurgery as surg
from attnsurgery.context import StepContext, make_clock_hook
from attnsurgery.families import Family
from attnsurgery.ops import agent as agent_ops
from attnsurgery.ops.token_merge import match_tokens, plan_merge
from attnsurgery.processors.agent import AgentProcessor, check_agent_layer
from attnsurgery.processors.token_merge import BlockInput
from tests.support.pipes import run_pipe

NON_SQUARE = (64, 96)


def effect(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def layer_setup(h: int, w: int, source: str, batch: int = 2):
    """A float64 attention layer, its agent processor on a fresh step clock, block input and tokens."""
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=4, dim_head=4, out_bias=True).double().eval().requires_grad_(False)
    context = StepContext(Family("sd15", "unet", 512, 8), latent_hw=(h, w), step_index=0, num_steps=10)
    block_input = BlockInput()
    processor = AgentProcessor(
        AttnProcessor2_0(),
        schedule=surg.AgentAttention().schedule,
        source=source,
        k_scale2=0.3,
        k_shortcut=0.075,
        compute_dtype=None,
        context=context,
        block_input=block_input,
        seed=None,
    )
    block_x = torch.randn(batch, h * w, 16, dtype=torch.float64)
    normed = torch.nn.functional.layer_norm(block_x, (16,))
    return attn, processor, block_input, block_x, normed


def explicit_agent_layer(attn, tokens, agents_in, pooled: tuple[int, int, int, int] | None = None):
    """to_q/to_k/to_v, explicit float64 agent attention maps, to_out."""

    def heads(t):
        return t.view(t.shape[0], t.shape[1], attn.heads, -1).transpose(1, 2)

    q, k, v = heads(attn.to_q(tokens)), heads(attn.to_k(tokens)), heads(attn.to_v(tokens))
    if pooled is None:
        a = heads(attn.to_q(agents_in))
    else:
        h, w, sy, sx = pooled
        grid = q.reshape(*q.shape[:2], h, w, -1)
        a = torch.stack(
            [grid[:, :, y : y + sy, x : x + sx].mean((2, 3)) for y in range(0, h, sy) for x in range(0, w, sx)], dim=2
        )
    s = q.shape[-1] ** -0.5
    agent_values = torch.softmax(a @ k.transpose(-1, -2) * s, -1) @ v
    out = torch.softmax(q @ a.transpose(-1, -2) * s**0.3, -1) @ agent_values + 0.075 * v
    return attn.to_out[0](out.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[1], -1))


def test_tome_agents_match_explicit_formula():
    h, w = 8, 12
    attn, processor, block_input, block_x, normed = layer_setup(h, w, "tome")
    block_input.hook(None, (block_x,), {})
    out = processor(attn, normed)
    match = match_tokens(block_x, h, w, 4, 4)  # phase 1 of the published schedule
    r, agent_r = agent_ops.merge_counts(h * w, match.num_src, 0.4, 0.95)
    assert agent_ops.agents_pay_off(h * w, r, agent_r)
    plan = plan_merge(match, r)
    want = plan.unmerge(explicit_agent_layer(attn, plan.merge(normed), plan_merge(match, agent_r).merge(normed)))
    torch.testing.assert_close(out, want)
    plain = AttnProcessor2_0()(attn, normed)
    assert effect(out, plain) > 1e-2  # agent attention is not the layer's own attention


def test_bfloat16_layer_with_fp32_attention():
    h, w = 8, 12
    attn, processor, block_input, block_x, normed = layer_setup(h, w, "tome")
    block_input.hook(None, (block_x,), {})
    want = processor(attn, normed)
    processor.compute_dtype = torch.float32
    block_input.hook(None, (block_x.bfloat16(),), {})
    out = processor(attn.bfloat16(), normed.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want, atol=5e-2, rtol=5e-2)


def test_pool_agents_match_explicit_formula():
    h, w = 9, 10  # ragged cells
    attn, processor, _, _, normed = layer_setup(h, w, "pool", batch=3)
    out = processor(attn, normed)
    torch.testing.assert_close(out, explicit_agent_layer(attn, normed, None, pooled=(h, w, 4, 4)))


def test_grid_smaller_than_a_cell_runs_the_layer_unchanged():
    attn, processor, block_input, block_x, normed = layer_setup(3, 3, "tome")
    block_input.hook(None, (block_x,), {})
    torch.testing.assert_close(processor(attn, normed), AttnProcessor2_0()(attn, normed))


def test_late_phase_runs_tome_through_the_inner_processor():
    h, w = 8, 12
    attn, processor, block_input, block_x, normed = layer_setup(h, w, "tome")
    processor.context.step_index = 4  # 40% of 10 steps: the second phase
    block_input.hook(None, (block_x,), {})
    plan = plan_merge(match_tokens(block_x, h, w, 2, 2), int(h * w * 0.4))
    torch.testing.assert_close(processor(attn, normed), plan.unmerge(AttnProcessor2_0()(attn, plan.merge(normed))))


def count_agent_calls(monkeypatch, step_of) -> list:
    """Patch the processor's agent attention to log ``step_of()`` at every call."""
    calls = []
    original = agent_ops.agent_attention

    def spy(*args, **kwargs):
        calls.append(step_of())
        return original(*args, **kwargs)

    monkeypatch.setattr("attnsurgery.processors.agent.agent_attention", spy)
    return calls


@pytest.mark.parametrize("steps", [20, 25, 50])
def test_schedule_switches_at_progress_04(sd15, monkeypatch, steps):
    """The pipeline's own clock hook over the DDIM timesteps; agents exactly in steps 0 .. 0.4 N - 1."""
    h, w = 8, 12
    attn, processor, block_input, block_x, normed = layer_setup(h, w, "tome")
    clock = make_clock_hook(processor.context, sd15.unet, lambda: sd15.scheduler)
    calls = count_agent_calls(monkeypatch, lambda: processor.context.step_index)
    sd15.scheduler.set_timesteps(steps)
    for t in sd15.scheduler.timesteps:
        clock(sd15.unet, (torch.zeros(2, 4, h, w), t), {})
        block_input.hook(None, (block_x,), {})
        processor(attn, normed)
    assert calls == list(range(math.floor(0.4 * steps)))


def test_schedule_in_the_pipeline(sd15, monkeypatch):
    handle = surg.apply(sd15, surg.AgentAttention(seed=0))
    calls = count_agent_calls(monkeypatch, lambda: handle.context.step_index)
    try:
        run_pipe(sd15, steps=5)
    finally:
        handle.remove()
    assert calls == [0] * 5 + [1] * 5  # floor(0.4 * 5) = 2 agent steps, on all five top-level layers


def test_batches_and_sizes(sd15):
    """CFG batch and odd batch (no CFG) on a non-square latent, both agent sources."""
    cases = ({"guidance_scale": 7.5}, {"guidance_scale": 1.0})
    bases = [run_pipe(sd15, size=NON_SQUARE, **kwargs) for kwargs in cases]
    for source in ("tome", "pool"):
        with surg.patched(sd15, surg.AgentAttention(agent_source=source, seed=3)):
            outs = [run_pipe(sd15, size=NON_SQUARE, **kwargs) for kwargs in cases]
        for out, base in zip(outs, bases, strict=True):
            assert out.shape == base.shape and torch.isfinite(out).all()
            assert effect(out, base) > 1e-3
    assert torch.equal(run_pipe(sd15, size=NON_SQUARE, guidance_scale=1.0), bases[1])  # removed exactly


def test_layers_with_extra_machinery_are_refused():
    check_agent_layer(Attention(query_dim=16, heads=2, dim_head=8), "plain")
    with pytest.raises(NotImplementedError, match="residual_connection"):
        check_agent_layer(Attention(query_dim=16, heads=2, dim_head=8, residual_connection=True), "odd.attn")


def test_config_round_trip_and_bad_input(sd15):
    plugin = surg.AgentAttention(
        schedule=[
            {"until": 0.5, "sx": 2, "sy": 2, "ratio": 0.3, "agent_ratio": 0.9},
            surg.AgentPhase(1.0, 2, 2, 0.3, 0.5),
        ],
        agent_source="pool",
    )
    assert surg.plugin_from_dict(plugin.to_dict()) == plugin
    assert surg.AgentAttention().schedule[0] == surg.AgentPhase(0.4, 4, 4, 0.4, 0.95)
    with pytest.raises(ValueError, match="agent_source"):
        surg.AgentAttention(agent_source="conv")
    with pytest.raises(ValueError, match="increasing"):
        surg.AgentAttention(schedule=[surg.AgentPhase(1.0, 2, 2, 0.4, 0.5), surg.AgentPhase(0.4, 4, 4, 0.4, 0.95)])
    with pytest.raises(ValueError, match="precision"):
        surg.AgentAttention(precision="fp8")
    with pytest.raises(ValueError, match="agent_ratio"):
        surg.AgentPhase(1.0, 2, 2, 0.4, 1.5)
    with pytest.raises(ValueError, match="conflict"):
        surg.apply(sd15, surg.AgentAttention(), surg.TokenMerging())


def test_agent_and_head_perturbation_on_one_layer_conflict_in_either_order(sd15):
    layer = "down_blocks.0.attentions.0"
    agent = surg.AgentAttention(layers=layer)
    pag = surg.PerturbedAttention(scale=2.0, layers=layer)
    for plugins in [(agent, pag), (pag, agent)]:
        with pytest.raises(ValueError, match="conflict at down_blocks.0.attentions.0.transformer_blocks.0.attn1"):
            surg.apply(sd15, *plugins)
        assert surg.active_surgeries(sd15) == []
    # on different layers they stack (the defaults: agents on the top level, PAG on the mid block)
    with surg.patched(sd15, surg.AgentAttention(), surg.PerturbedAttention(scale=2.0)) as handle:
        assert "mid_block.attentions.0.transformer_blocks.0.attn1" in handle.sites


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(k_shortcut=math.nan), "k_shortcut=nan is invalid"),
        (dict(k_shortcut=math.inf), "k_shortcut=inf is invalid"),
        (dict(k_scale2=math.nan), "k_scale2=nan is invalid"),
        (dict(layers=5), "AgentAttention layers=5 is invalid"),
    ],
)
def test_non_finite_or_mistyped_fields_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        surg.AgentAttention(**kwargs)
