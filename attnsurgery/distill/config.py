"""The settings of one distillation run, validated, with the loss weights they imply."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .loss import LOSS_PRESETS, LossWeights

__all__ = ["DistillConfig"]


@dataclass(frozen=True)
class DistillConfig:
    """Settings of one distillation run (defaults: the ConvFusion paper's).

    Args:
        preset: loss weights, ``"convfusion"`` (1, 1, 0.001) or ``"linfusion"`` (1, 0.5, 0.5).
        loss_weights: (noise, teacher, feature) weights overriding the preset.
        min_snr_gamma: Min-SNR gamma of the prediction terms (paper: 5), None for plain MSE.
        steps: total optimiser steps.
        batch_size: samples per step and process.
        lr, weight_decay, betas: AdamW (paper: 3e-4, 0.03, (0.9, 0.99)).
        warmup_steps: linear learning-rate warm-up (paper: 500).
        cooldown_steps: linear learning-rate fall to 0 over the last steps (paper: none, 0).
        grad_clip: max gradient norm (paper: 1.0).
        caption_dropout: probability of training a sample on the empty prompt (keeps CFG working).
        resolution: training image side in pixels; None for the family's native one.
        checkpoint_every: steps between checkpoints (0: only the final save).
        gradient_checkpointing: recompute activations in backward (less memory, more compute).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (accelerate).
        seed: seed of data order, noise, timesteps and block init.
        kernel_size, gate: block settings (None: the family's kernel preset).
        teacher_steps, teacher_guidance: sampling settings when the teacher makes data from prompts.
    """

    preset: str = "convfusion"
    loss_weights: tuple[float, float, float] | None = None
    min_snr_gamma: float | None = 5.0
    steps: int = 1000
    batch_size: int = 4
    lr: float = 3e-4
    weight_decay: float = 0.03
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 500
    cooldown_steps: int = 0
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    resolution: int | None = None
    checkpoint_every: int = 500
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    seed: int = 0
    kernel_size: int | None = None
    gate: str = "mul"
    teacher_steps: int = 25
    teacher_guidance: float = 7.5

    def __post_init__(self) -> None:
        if self.preset not in LOSS_PRESETS:
            raise ValueError(f"preset must be one of {sorted(LOSS_PRESETS)}, got {self.preset!r}.")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("warmup_steps", "cooldown_steps", "checkpoint_every", "teacher_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.cooldown_steps > self.steps:
            raise ValueError(f"cooldown_steps must be <= steps ({self.steps}), got {self.cooldown_steps}.")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError(f"lr and grad_clip must be > 0, got lr={self.lr}, grad_clip={self.grad_clip}.")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}.")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"resolution must be a multiple of 8 pixels, got {self.resolution}.")
        self.weights()  # validates the weights

    def weights(self) -> LossWeights:
        """The loss weights this config trains with."""
        if self.loss_weights is None:
            return LossWeights.preset(self.preset, self.min_snr_gamma)
        return LossWeights(*self.loss_weights, min_snr_gamma=self.min_snr_gamma)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))
