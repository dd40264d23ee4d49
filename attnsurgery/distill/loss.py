"""The distillation objective for attention replacements (ConvFusion, LinFusion, CLEAR).

loss = w_noise * MSE(student eps, true target) + w_teacher * MSE(student eps, teacher eps)
       + w_feature * sum over replaced blocks MSE(student block output, teacher attn1 output)

Weights: ConvFusion (arXiv 2504.21292) uses (1, 1, 0.001); LinFusion and CLEAR use (1, 0.5, 0.5). The two
prediction terms can carry Min-SNR weights (Hang et al. 2023; ConvFusion trains with gamma = 5), computed
by ``attnsurgery.training.min_snr_weights``. Student blocks see the student's own upstream features (no
teacher forcing), so the feature term compares each block's output with what the teacher's attention
produced at the same place in the teacher's pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_PRESETS: dict[str, tuple[float, float, float]] = {
    "convfusion": (1.0, 1.0, 0.001),
    "linfusion": (1.0, 0.5, 0.5),
}


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three terms and the Min-SNR gamma (None: unweighted)."""

    noise: float = 1.0
    teacher: float = 1.0
    feature: float = 0.001
    min_snr_gamma: float | None = 5.0

    def __post_init__(self) -> None:
        if min(self.noise, self.teacher, self.feature) < 0:
            raise ValueError(f"Loss weights must be >= 0, got {self}.")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0 or None, got {self.min_snr_gamma}.")

    @classmethod
    def preset(cls, name: str, min_snr_gamma: float | None = 5.0) -> LossWeights:
        """``"convfusion"`` (1, 1, 0.001) or ``"linfusion"`` (1, 0.5, 0.5).

        Example:
            >>> LossWeights.preset("linfusion").feature
            0.5
        """
        if name not in LOSS_PRESETS:
            raise ValueError(f"Unknown loss preset {name!r}; choose one of {sorted(LOSS_PRESETS)}.")
        return cls(*LOSS_PRESETS[name], min_snr_gamma=min_snr_gamma)


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).square().flatten(1).mean(dim=1)


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    student_features: Mapping[str, torch.Tensor],
    teacher_features: Mapping[str, torch.Tensor],
    weights: LossWeights,
    sample_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The three-term loss and its parts (as floats, for logging).

    Args:
        student, teacher, target: predictions [B, C, H, W] of the student, the frozen teacher, and the
            true target (noise for epsilon models, velocity for v models).
        student_features, teacher_features: block path -> output [B, N, C] of the student's conv block and
            of the teacher's attn1 at the same path; the keys must agree.
        weights: the term weights.
        sample_weights: [B] per-sample weights of the prediction terms (Min-SNR), or None.

    Example:
        >>> weights = LossWeights.preset("convfusion")
        >>> loss, parts = distillation_loss(s, t, noise, s_feats, t_feats, weights)  # doctest: +SKIP
    """
    if set(student_features) != set(teacher_features):
        raise ValueError(
            f"Student and teacher features cover different blocks: "
            f"{sorted(set(student_features) ^ set(teacher_features))}."
        )
    noise_term = _per_sample_mse(student, target)
    teacher_term = _per_sample_mse(student, teacher.detach())
    if sample_weights is not None:
        noise_term, teacher_term = noise_term * sample_weights, teacher_term * sample_weights
    feature_term = sum(
        (
            F.mse_loss(student_features[path].float(), teacher_features[path].detach().float())
            for path in student_features
        ),
        start=student.new_zeros((), dtype=torch.float32),
    )
    total = weights.noise * noise_term.mean() + weights.teacher * teacher_term.mean() + weights.feature * feature_term
    parts = {
        "noise": noise_term.mean().item(),
        "teacher": teacher_term.mean().item(),
        "feature": float(feature_term.detach()),
    }
    return total, parts
