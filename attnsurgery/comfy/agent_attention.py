"""Agent attention (AgentSD) on U-Net self-attention, as a ComfyUI node.

An attn1 patch leaves the tokens alone and puts the layer's normed input into that call's ``extra_options``
(the matching metric); an attn1 replace patch on each chosen layer then receives the projected q, k, v and
runs :func:`attnsurgery.ops.agent.agent_attention` with agents that are ToMe clusters (or pooled queries),
or ToMe attention when agents do not pay off (AgentSD's rule). Merging is an average and SD's projections
have no bias, so merging projected tokens equals projecting merged tokens. Plain and ToMe attention go
through ComfyUI's attention function (the user's backend); agent attention's two softmax stages are the op's.

On DiTs (ComfyUI 0.20.1 or newer) each call of the chosen blocks runs the plugin's own joint-call processor
(:class:`~attnsurgery.processors.joint_agent.JointAgentProcessor`: its phases, agents from the image queries,
text keys global) through a block patch's attention override.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ..ops.agent import agent_attention, agents_pay_off, merge_counts, pool_agents
from ..ops.token_merge import match_tokens, plan_merge
from ..plugins.agent import AgentAttention, AgentPhase
from ..processors.joint_agent import JointAgentProcessor
from .dit import dit_family, dit_sites, patch_joint_processors
from .node import LAYERS_INPUT, SEED_INPUT, ModelPatchNode
from .patching import (
    call_generator,
    claim_token_layers,
    comfy_attention,
    current_sigma,
    merge_heads,
    model_family,
    select_heads,
    select_layers,
    sigma_window,
    split_heads,
    token_grid,
    unet_attention_sites,
)

__all__ = ["AttnSurgeryAgentAttention"]

METRIC_KEY = "attnsurgery_agent_metric"


def _phase(phases: list[tuple[float, AgentPhase]], sigma: float) -> AgentPhase:
    """The phase whose window holds ``sigma`` (phases given with the sigma at which each one ends)."""
    for end_sigma, phase in phases:
        if sigma > end_sigma:
            return phase
    return phases[-1][1]


def agent_replace(config: AgentAttention, phases: list[tuple[float, AgentPhase]]):
    """The attn1 replace patch: agent attention, or ToMe attention when agents do not pay off."""

    def replace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        metric = extra_options.pop(METRIC_KEY, q)
        n_heads, num_tokens = extra_options["n_heads"], q.shape[1]
        phase = _phase(phases, current_sigma(extra_options["sigmas"]))
        h, w = token_grid(extra_options["original_shape"], num_tokens)
        heads = [split_heads(t, n_heads) for t in (q, k, v)]
        if h < phase.sy or w < phase.sx:  # no full cell: no dst to merge into, no agents
            return comfy_attention(q, k, v, extra_options)
        num_src = num_tokens - (h // phase.sy) * (w // phase.sx)
        r, agent_r = merge_counts(num_tokens, num_src, phase.ratio, phase.agent_ratio)
        use_agents = agents_pay_off(num_tokens, r, agent_r)
        if use_agents and config.agent_source == "pool":
            agents = pool_agents(heads[0], h, w, phase.sx, phase.sy)
            return merge_heads(agent_attention(*heads, agents, k_scale2=config.k_scale2, k_shortcut=config.k_shortcut))
        if r <= 0 and not use_agents:
            return comfy_attention(q, k, v, extra_options)
        generator = call_generator(config.seed, extra_options) if config.use_rand and q.shape[0] % 2 == 0 else None
        match = match_tokens(metric, h, w, phase.sx, phase.sy, generator=generator)
        plan = plan_merge(match, r)
        merged = [plan.merge(t) for t in (q, k, v)]
        if not use_agents:
            return plan.unmerge(comfy_attention(*merged, extra_options))
        agents = split_heads(plan_merge(match, agent_r).merge(q), n_heads)
        merged = [split_heads(t, n_heads) for t in merged]
        out = agent_attention(*merged, agents, k_scale2=config.k_scale2, k_shortcut=config.k_shortcut)
        return plan.unmerge(merge_heads(out))

    return replace


def keep_metric(keys: set[tuple[str, int, int]]):
    """The attn1 patch handing the chosen layers' normed input to their replace patch, tokens unchanged."""

    def patch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict):
        block = extra_options.get("block")
        if block is not None and (block[0], block[1], extra_options.get("block_index", 0)) in keys:
            extra_options[METRIC_KEY] = q
        return q, k, v

    return patch


DEFAULT_SCHEDULE = json.dumps([vars(phase) for phase in AgentAttention().schedule])


class AttnSurgeryAgentAttention(ModelPatchNode):
    """AgentSD on chosen U-Net self-attention layers, or on the image tokens of FLUX and SD3 layers."""

    DESCRIPTION = (
        "Agent attention (AgentSD): a few agent tokens gather from all tokens and every token reads from the "
        "agents; ToMe attention in the phases where agents do not pay off. U-Nets, and on ComfyUI 0.20.1 or "
        "newer FLUX and SD3/SD3.5 (agents from the image tokens, text keys global; layers such as 'all')."
    )

    @classmethod
    def inputs(cls) -> dict[str, Any]:
        return {
            "layers": LAYERS_INPUT,
            "schedule": (
                "STRING",
                {
                    "default": DEFAULT_SCHEDULE,
                    "multiline": True,
                    "tooltip": "JSON phases {until, sx, sy, ratio, agent_ratio}; 'until' is "
                    "the denoising percent where a phase ends (AgentSD's default).",
                },
            ),
            "agent_source": (
                ["tome", "pool"],
                {
                    "default": "tome",
                    "tooltip": "tome: agents are ToMe clusters (published); pool: queries average-pooled per cell.",
                },
            ),
            "k_scale2": (
                "FLOAT",
                {
                    "default": AgentAttention.k_scale2,
                    "min": 0.01,
                    "max": 2.0,
                    "step": 0.05,
                    "tooltip": "Exponent of the second softmax's scale (AgentSD: 0.3).",
                },
            ),
            "k_shortcut": (
                "FLOAT",
                {
                    "default": AgentAttention.k_shortcut,
                    "min": 0.0,
                    "max": 1.0,
                    "step": 0.005,
                    "tooltip": "Weight of the value shortcut (AgentSD: 0.075).",
                },
            ),
            "seed": SEED_INPUT,
        }

    def patch(
        self, model: Any, layers: str, schedule: str, agent_source: str, k_scale2: float, k_shortcut: float, seed: int
    ) -> tuple[Any]:
        """Clone ``model`` and register the metric patch and the agent replace patches."""
        try:
            phases = json.loads(schedule)
        except json.JSONDecodeError as error:
            raise ValueError(f"schedule must be a JSON list of phases like {DEFAULT_SCHEDULE}: {error}") from None
        config = AgentAttention(
            schedule=tuple(phases),
            agent_source=agent_source,
            k_scale2=k_scale2,
            k_shortcut=k_shortcut,
            use_rand=seed >= 0,
            seed=seed if seed >= 0 else None,
        )
        if not hasattr(model.model.diffusion_model, "input_blocks"):
            return (_patch_dit(model, config, layers),)
        keys = select_layers(unet_attention_sites(model), layers, model_family(model))
        ends = [(sigma_window(model, phase.until, phase.until)[0], phase) for phase in config.schedule]
        patched = model.clone()
        claim_token_layers(patched, keys, "AgentAttention")
        patched.set_model_attn1_patch(keep_metric(keys))
        replace = agent_replace(config, ends)
        for key in sorted(keys):
            patched.set_model_attn1_replace(replace, *key)
        return (patched,)


def _patch_dit(model: Any, config: AgentAttention, layers: str) -> Any:
    """The clone of a FLUX or SD3 model with the plugin's joint-call agent attention on the chosen layers."""
    selected = list(select_heads(dit_sites(model), layers, dit_family(model)))

    def make(inner, site, clock, seed) -> JointAgentProcessor:
        return JointAgentProcessor(
            inner,
            path=site.path,
            text_first=True,  # ComfyUI's Flux and MMDiT put the text first in every joint call
            context=clock,
            schedule=config.schedule,
            source=config.agent_source,
            k_scale2=config.k_scale2,
            k_shortcut=config.k_shortcut,
            seed=seed,
        )

    seed = config.seed if config.use_rand else None
    return patch_joint_processors(model, selected, make, seed, "AgentAttention")
