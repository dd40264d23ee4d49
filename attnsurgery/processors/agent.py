"""The AgentSD processor: agent attention through the layer's own projections, else ToMe attention.

Per call the schedule gives the phase (cell size, merge ratio, agent ratio). When AgentSD's rule says
agents pay off, the processor merges the (normed) block tokens, projects them with the layer's own
``to_q``/``to_k``/``to_v`` (and ``norm_q``/``norm_k`` when present), runs the two-SDPA agent attention
and the layer's ``to_out``, and unmerges. Otherwise it runs the model's own processor on ToMe-merged
tokens, exactly like :class:`~attnsurgery.processors.token_merge.TokenMergeProcessor`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..ops.agent import agent_attention, agents_pay_off, merge_counts, pool_agents
from ..ops.token_merge import plan_merge
from .token_merge import MergingProcessor, check_cells, check_fraction, check_self_attention_call

__all__ = ["AgentPhase", "AgentProcessor", "check_agent_layer"]

AgentSource = Literal["tome", "pool"]


@dataclass(frozen=True)
class AgentPhase:
    """Settings used while the denoising progress lies in the first ``until`` of the schedule.

    Attributes:
        until: end of the phase as a fraction of the schedule (the last phase should reach 1.0).
        sx: dst / pooling cell width.
        sy: dst / pooling cell height.
        ratio: fraction of tokens ToMe removes from queries, keys and values.
        agent_ratio: fraction of tokens merged away to form the agents.
    """

    until: float
    sx: int
    sy: int
    ratio: float
    agent_ratio: float

    def __post_init__(self) -> None:
        if not 0.0 < self.until <= 1.0:
            raise ValueError(f"AgentPhase.until={self.until!r} must lie in (0, 1]: it is a schedule fraction")
        check_cells("AgentPhase", self.sx, self.sy)
        check_fraction("AgentPhase", "ratio", self.ratio)
        check_fraction("AgentPhase", "agent_ratio", self.agent_ratio)


def check_agent_layer(attn: torch.nn.Module, path: str) -> None:
    """Agent attention calls the layer's projections itself; refuse layers with extra machinery.

    Raises:
        NotImplementedError: naming the feature the layer has.
    """
    features = {
        "spatial_norm": getattr(attn, "spatial_norm", None) is not None,
        "group_norm": getattr(attn, "group_norm", None) is not None,
        "residual_connection": bool(getattr(attn, "residual_connection", False)),
        "rescale_output_factor != 1": getattr(attn, "rescale_output_factor", 1.0) != 1.0,
        "added key/value projections": getattr(attn, "added_kv_proj_dim", None) is not None,
        "cross-attention": bool(getattr(attn, "is_cross_attention", False)),
    }
    found = [name for name, present in features.items() if present]
    if found:
        raise NotImplementedError(
            f"agent attention cannot run on {path}: it has {', '.join(found)}. Select plain transformer "
            "self-attention layers (attn1), e.g. layers='top'"
        )


class AgentProcessor(MergingProcessor):
    """AgentSD on one self-attention layer.

    In agent steps the inner processor is not called (the attention itself is replaced), so a wrapper
    that must see every call of this layer has to be applied after this one (outermost).

    Args:
        inner: the layer's current processor (runs the ToMe phases).
        schedule: phases in order of ``until``.
        source: ``"tome"`` (agents are ToMe clusters of the block tokens) or ``"pool"`` (agents are the
            queries average-pooled over ``sy x sx`` cells; no sorting, and queries/keys/values unmerged).
        k_scale2: exponent of the second softmax's scale.
        k_shortcut: weight of the value shortcut.
        compute_dtype: dtype of both attentions, None for the input dtype.
        **machinery: ``context``, ``block_input``, ``seed`` (see ``MergingProcessor``).
    """

    def __init__(
        self,
        inner: Any,
        *,
        schedule: tuple[AgentPhase, ...],
        source: AgentSource,
        k_scale2: float,
        k_shortcut: float,
        compute_dtype: torch.dtype | None,
        **machinery: Any,
    ) -> None:
        super().__init__(inner, **machinery)
        self.schedule = schedule
        self.context.watch(*(phase.until for phase in schedule))
        self.source = source
        self.k_scale2, self.k_shortcut, self.compute_dtype = k_scale2, k_shortcut, compute_dtype

    def phase(self) -> AgentPhase:
        """The phase of the current step (the last phase once the schedule is past every ``until``)."""
        for phase in self.schedule:
            if self.context.in_first(phase.until):
                return phase
        return self.schedule[-1]

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        check_self_attention_call(hidden_states, args, kwargs)
        metric = self.block_input.take(hidden_states)
        phase = self.phase()
        num_tokens = hidden_states.shape[1]
        h, w = self.grid(hidden_states)
        if h < phase.sy or w < phase.sx:  # no full cell: no dst to merge into, no agents
            return self.inner(attn, hidden_states, *args, **kwargs)
        num_src = num_tokens - (h // phase.sy) * (w // phase.sx)
        r, agent_r = merge_counts(num_tokens, num_src, phase.ratio, phase.agent_ratio)
        use_agents = agents_pay_off(num_tokens, r, agent_r)
        if use_agents and self.source == "pool":
            q = self._project(attn, attn.to_q, hidden_states, attn.norm_q)
            return self._attend(attn, hidden_states, q, pool_agents(q, h, w, phase.sx, phase.sy))
        if r <= 0 and not use_agents:
            return self.inner(attn, hidden_states, *args, **kwargs)
        match = self.match(metric, (h, w), phase.sx, phase.sy)
        plan = plan_merge(match, r)
        if not use_agents:
            return self.merged_inner(plan, attn, hidden_states, *args, **kwargs)
        merged = plan.merge(hidden_states)
        agents = self._project(attn, attn.to_q, plan_merge(match, agent_r).merge(hidden_states), attn.norm_q)
        q = self._project(attn, attn.to_q, merged, attn.norm_q)
        return plan.unmerge(self._attend(attn, merged, q, agents))

    @staticmethod
    def _project(
        attn: torch.nn.Module, linear: torch.nn.Module, x: torch.Tensor, norm: torch.nn.Module | None
    ) -> torch.Tensor:
        """``[B, N, C] -> [B, heads, N, head_dim]`` through the layer's projection and its optional norm."""
        batch, tokens, _ = x.shape
        out = linear(x).view(batch, tokens, attn.heads, -1).transpose(1, 2)
        return out if norm is None else norm(out)

    def _attend(self, attn: torch.nn.Module, x: torch.Tensor, q: torch.Tensor, agents: torch.Tensor) -> torch.Tensor:
        """Agent attention of tokens ``x`` (queries ``q`` given) and the layer's output projection."""
        k = self._project(attn, attn.to_k, x, attn.norm_k)
        v = self._project(attn, attn.to_v, x, None)
        out = agent_attention(
            q,
            k,
            v,
            agents,
            k_scale2=self.k_scale2,
            k_shortcut=self.k_shortcut,
            compute_dtype=self.compute_dtype,
        )
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return attn.to_out[1](attn.to_out[0](out))
