"""Agent attention (AgentSD) as a plugin: agent attention early in sampling, ToMe attention after."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..ops.agent import K_SCALE2, K_SHORTCUT
from ..processors.agent import AgentPhase, AgentProcessor, check_agent_layer
from ..processors.joint_agent import JointAgentProcessor
from ..selectors import LayerSelector
from .base import Plugin, check_number, normalize_layers
from .dit_layers import install_joint_processors
from .token_merging import install_merging

if TYPE_CHECKING:
    from ..surgery import Surgery

__all__ = ["AgentAttention", "AgentPhase", "PUBLISHED_SCHEDULE"]

PRECISIONS = {None: None, "fp32": torch.float32}


PUBLISHED_SCHEDULE = (
    AgentPhase(until=0.4, sx=4, sy=4, ratio=0.4, agent_ratio=0.95),  # steps 0-19 of 50: agents on
    AgentPhase(until=1.0, sx=2, sy=2, ratio=0.4, agent_ratio=0.5),  # steps 20-49: the rule picks ToMe
)
"""AgentSD's published SD schedule (50 steps), written in progress so any step count keeps it."""


@dataclass(frozen=True)
class AgentAttention(Plugin):
    """AgentSD: a few agent tokens gather from all tokens, then every token reads from the agents.

    ``O = softmax(Q A^T s**k_scale2) softmax(A K^T s) V + k_shortcut V`` with two SDPA calls (no N x N
    map). Each step takes the phase of the schedule it falls in (by progress, so 20, 25 or 50 steps all
    switch at 40%); a layer uses agents only when ``2 (N - agent_r) < N - r`` and otherwise runs ToMe
    attention through the model's own processor.

    Args:
        layers: layer selector; self-attention layers only. Default (None): the highest-resolution level
            (SD1.x/2.x ``down_blocks.0``/``up_blocks.3``; SDXL its 64x64 level at 1024 px); on DiTs every
            image-attending layer, where the agents work inside each joint attention call with text keys
            global (``processors.joint_agent``).
        schedule: phases (:class:`AgentPhase`, or dicts of its fields) in order of ``until``. Default:
            AgentSD's published one, 4x4 cells with agents until 40%, then 2x2 cells and plain ToMe.
        agent_source: ``"tome"`` (agents are ToMe clusters, as published) or ``"pool"`` (queries
            average-pooled over each cell: no sorting, queries/keys/values not merged).
        k_scale2: exponent of the second softmax's scale ``d**-0.5`` (AgentSD: 0.3).
        k_shortcut: weight of the value shortcut (AgentSD: 0.075).
        precision: None computes in the model's dtype; ``"fp32"`` runs both attentions in float32
            (needed for SD2.1 in fp16).
        use_rand: random dst position per cell (position 0 for odd batches).
        seed: seed of the private generator (else the surgery's seed).

    Example:
        >>> handle = attnsurgery.apply(pipe, attnsurgery.AgentAttention())
        >>> image = pipe("a castle", num_inference_steps=50).images[0]
        >>> handle.remove()
    """

    layers: LayerSelector | None = None
    schedule: tuple[AgentPhase, ...] = PUBLISHED_SCHEDULE
    agent_source: Literal["tome", "pool"] = "tome"
    k_scale2: float = K_SCALE2
    k_shortcut: float = K_SHORTCUT
    precision: Literal["fp32"] | None = None
    use_rand: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.layers is not None:
            normalize_layers(self, self.layers)
        phases = tuple(AgentPhase(**p) if isinstance(p, dict) else p for p in self.schedule)
        if not phases or not all(isinstance(p, AgentPhase) for p in phases):
            raise ValueError(f"AgentAttention.schedule={self.schedule!r}: give one or more AgentPhase")
        ends = [phase.until for phase in phases]
        if ends != sorted(set(ends)):
            raise ValueError(f"AgentAttention.schedule phases need strictly increasing `until`, got {ends}")
        object.__setattr__(self, "schedule", phases)
        if self.agent_source not in ("tome", "pool"):
            raise ValueError(f"AgentAttention.agent_source={self.agent_source!r} must be 'tome' or 'pool'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"AgentAttention.precision={self.precision!r} must be None or 'fp32'")
        check_number("AgentAttention", "k_scale2", self.k_scale2, 0.0, math.inf, "an exponent > 0 (AgentSD: 0.3)")
        if self.k_scale2 == 0:
            raise ValueError("AgentAttention k_scale2=0 is invalid; use an exponent > 0 (AgentSD: 0.3)")
        check_number("AgentAttention", "k_shortcut", self.k_shortcut, -math.inf, math.inf, "a weight (AgentSD: 0.075)")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["schedule"] = [dataclasses.asdict(phase) for phase in self.schedule]
        return data

    def attach(self, surgery: Surgery) -> None:
        unet = surgery.model.family.kind == "unet"
        processor = AgentProcessor if unet else JointAgentProcessor

        def make_processor(inner: Any, **machinery: Any) -> AgentProcessor | JointAgentProcessor:
            return processor(
                inner,
                schedule=self.schedule,
                source=self.agent_source,
                k_scale2=self.k_scale2,
                k_shortcut=self.k_shortcut,
                compute_dtype=PRECISIONS[self.precision],
                **machinery,
            )

        if not unet:
            # Agents inside each joint attention call (processors.joint_agent); the replaced call still reaches a
            # head perturbation wrapped around it, so only "tokens" is claimed.
            selector = "all" if self.layers is None else self.layers
            install_joint_processors(surgery, self, selector, self.seed, self.use_rand, make_processor)
            return
        layers = "top" if self.layers is None else self.layers
        for layer in surgery.model.select(layers, kinds=("self",)):
            check_agent_layer(layer.module, layer.path)
        # Agent steps compute attention with two SDPA calls of their own, not through the inner processor,
        # so a head perturbation on the same layer would be skipped or hit the wrong call: claim "heads" too.
        install_merging(surgery, self, layers, self.seed, self.use_rand, make_processor, extra_roles=("heads",))
