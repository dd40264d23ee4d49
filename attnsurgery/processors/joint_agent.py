"""Agent attention (AgentSD) inside a DiT layer's joint attention call: agents from the image tokens, text
keys global in both steps.

Per head, with ``s = d**-0.5``, image tokens merged by ToMe's plan (``ratio``; sizes ``n_j``), agents ``A``
(ToMe clusters of the image queries with ``agent_ratio``, or the image queries pooled over ``sx x sy``
cells) and the call's text keys/values ``K_t, V_t``::

    V_A   = softmax([A K_t^T s, A K_m^T s + log n]) [V_t; V_m]           agents gather from every key
    O_m   = softmax([Q_m A^T s**k_scale2, Q_m K_t^T s]) [V_A; V_t] + k_shortcut V_m
    O_img = unmerge(O_m);  text queries: dense attention over every original key

The agents are built from the queries the model attends with (after qk_norm and RoPE), where AgentSD
projects merged block inputs; on a U-Net without qk_norm the two agree, on DiTs the SDPA call is the only
place the layer's own processor lets us in. ``agent_source="pool"`` is our variant (not AgentSD's): no
sorting, and the image queries, keys and values stay unmerged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..context import StepContext
from ..ops.agent import agents_pay_off, merge_counts, pool_agents
from ..ops.token_merge import TokenMerge, plan_merge
from ..rng import CallInt
from .agent import AgentPhase, AgentSource
from .joint_merge import key_bias, match_image_keys, merged_joint_attention
from .joint_replace import JointCallProcessor, JointCompute, Pair, join_tokens, split_tokens

__all__ = ["JointAgentProcessor", "agent_joint_attention"]


def agent_joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: TokenMerge | None,
    agents: torch.Tensor,
    *,
    num_text: int,
    text_first: bool,
    scale: float,
    k_scale2: float,
    k_shortcut: float,
) -> torch.Tensor:
    """The module docstring's maths: ``[B, H, N, D]`` q/k/v, ``plan`` over the image tokens (None: unmerged),
    ``agents`` ``[B, H, n, D]``; returns ``[B, H, N, D]``."""
    queries, keys, values, bias = q, k, v, None  # the pool source: every image token is its own slot
    if plan is not None:
        joint = plan.with_passthrough(num_text, text_first)
        queries, keys, values = (joint.merge_heads(x) for x in (q, k, v))
        bias = key_bias(joint, q.dtype)
    agent_values = F.scaled_dot_product_attention(agents, keys, values, attn_mask=bias, scale=scale)
    (tq, _), (tk, _), (tv, _) = (split_tokens(x, num_text, text_first) for x in (q, k, v))
    (_, mq), (_, mv) = (split_tokens(x, num_text, text_first) for x in (queries, values))
    # one softmax over agents (temperature s**k_scale2) and text keys (s): fold the scales into the keys
    read_keys = torch.cat((agents * scale**k_scale2, tk * scale), 2)
    image_out = F.scaled_dot_product_attention(mq, read_keys, torch.cat((agent_values, tv), 2), scale=1.0)
    image_out = image_out + k_shortcut * mv
    image_out = image_out if plan is None else plan.unmerge_heads(image_out)
    text_out = F.scaled_dot_product_attention(tq, k, v, scale=scale)
    return join_tokens(text_out, image_out, text_first)


class JointAgentProcessor(JointCallProcessor):
    """AgentSD on one DiT layer, with AgentSD's phases on the step clock (see the module docstring).

    Steps whose phase does not pay off for agents (``2 (N - agent_r) >= N - r``) run merged joint attention
    (ToMe, ``ratio``) instead, as AgentSD runs ToMe there; a phase with ratio 0 and no agents leaves the call
    untouched.

    Args:
        inner, path, text_first: the layer, as for every joint-call wrapper.
        context: the step clock.
        schedule: AgentSD phases in order of ``until``.
        source: "tome" (agents are ToMe clusters of the image queries) or "pool" (pooled image queries).
        k_scale2, k_shortcut: AgentSD's constants.
        compute_dtype: dtype of the attention maths (float32 for half-precision models), None for the input's.
        seed: this call's private seed of the dst choice, or None.
    """

    def __init__(
        self,
        inner: Any,
        *,
        path: str,
        text_first: bool,
        context: StepContext,
        schedule: tuple[AgentPhase, ...],
        source: AgentSource,
        k_scale2: float,
        k_shortcut: float,
        compute_dtype: torch.dtype | None = None,
        seed: CallInt | None = None,
    ) -> None:
        super().__init__(inner, path=path, text_first=text_first, technique="AgentAttention")
        self.context, self.schedule, self.source = context, schedule, source
        context.watch(*(phase.until for phase in schedule))
        self.k_scale2, self.k_shortcut, self.seed = k_scale2, k_shortcut, seed
        self.compute_dtype = compute_dtype

    def phase(self) -> AgentPhase:
        """The phase of the current step (the last one past every ``until``)."""
        return next((p for p in self.schedule if self.context.in_first(p.until)), self.schedule[-1])

    def plan(self) -> JointCompute | None:
        phase, grid = self.phase(), self.context.image_grid()
        if grid[0] < phase.sy or grid[1] < phase.sx:
            return None
        image = grid[0] * grid[1]
        r, agent_r = merge_counts(
            image, image - (grid[0] // phase.sy) * (grid[1] // phase.sx), phase.ratio, phase.agent_ratio
        )
        use_agents = agents_pay_off(image, r, agent_r)
        if not use_agents and r <= 0:
            return None
        return lambda q, k, v, call: self._attend(phase, grid, r, agent_r, use_agents, q, k, v, call)

    def _attend(
        self,
        phase: AgentPhase,
        grid: Pair,
        r: int,
        agent_r: int,
        use_agents: bool,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        call: dict[str, Any],
    ) -> torch.Tensor:
        out_dtype = q.dtype
        if self.compute_dtype is not None:
            q, k, v = (t.to(self.compute_dtype) for t in (q, k, v))
        x = self.inputs(grid, q, k, v, call)
        (_, image_q), (_, image_k) = (split_tokens(t, x.num_text, self.text_first) for t in (x.q, x.k))
        plan = None  # the pool source leaves the image tokens unmerged
        if use_agents and self.source == "pool":
            agents = pool_agents(image_q, grid[0], grid[1], phase.sx, phase.sy)
        else:
            match = match_image_keys(image_k, grid, phase.sx, phase.sy, self.seed)
            plan = plan_merge(match, r)
            if not use_agents:
                out = merged_joint_attention(
                    x.q, x.k, x.v, plan, num_text=x.num_text, text_first=self.text_first, mode="qkv", scale=x.scale
                )
                return x.output(out, out_dtype)
            agents = plan_merge(match, agent_r).merge_heads(image_q)
        out = agent_joint_attention(
            x.q,
            x.k,
            x.v,
            plan,
            agents,
            num_text=x.num_text,
            text_first=self.text_first,
            scale=x.scale,
            k_scale2=self.k_scale2,
            k_shortcut=self.k_shortcut,
        )
        return x.output(out, out_dtype)
