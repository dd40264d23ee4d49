"""The three-term distillation loss and Min-SNR weights against hand computations."""

from __future__ import annotations

import pytest
import torch

from attnsurgery.distill.loss import LossWeights, distillation_loss
from attnsurgery.training import min_snr_weights


def test_terms_and_weights() -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher, target = (torch.randn(2, 4, 3, 3, generator=generator) for _ in range(3))
    features_s = {key: torch.randn(2, n, 8, generator=generator) for key, n in (("a", 9), ("b", 4))}
    features_t = {key: torch.randn(value.shape, generator=generator) for key, value in features_s.items()}
    weights = LossWeights(noise=1.0, teacher=0.5, feature=0.25, min_snr_gamma=None)
    loss, parts = distillation_loss(student, teacher, target, features_s, features_t, weights)
    noise = (student - target).square().mean()
    distil = (student - teacher).square().mean()
    feature = sum((features_s[k] - features_t[k]).square().mean() for k in "ab")
    torch.testing.assert_close(loss, noise + 0.5 * distil + 0.25 * feature)
    expected = {"noise": noise.item(), "teacher": distil.item(), "feature": feature.item()}
    assert parts == pytest.approx(expected)
    sample_weights = torch.tensor([1.0, 0.0])
    weighted, _ = distillation_loss(student, teacher, target, features_s, features_t, weights, sample_weights)
    first = ((student[0] - target[0]).square().mean() + 0.5 * (student[0] - teacher[0]).square().mean()) / 2
    torch.testing.assert_close(weighted, first + 0.25 * feature)


def test_only_the_student_gets_gradients() -> None:
    student = torch.randn(1, 4, 2, 2, requires_grad=True)
    teacher = torch.randn(1, 4, 2, 2, requires_grad=True)
    loss, _ = distillation_loss(student, teacher, torch.zeros(1, 4, 2, 2), {}, {}, LossWeights())
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None


def test_presets_and_bad_input() -> None:
    assert LossWeights.preset("convfusion") == LossWeights(1.0, 1.0, 0.001, 5.0)
    assert LossWeights.preset("linfusion", min_snr_gamma=None) == LossWeights(1.0, 0.5, 0.5, None)
    with pytest.raises(ValueError, match="Unknown loss preset"):
        LossWeights.preset("clear")
    with pytest.raises(ValueError, match=">= 0"):
        LossWeights(noise=-1.0)
    with pytest.raises(ValueError, match="different blocks"):
        distillation_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), {"a": torch.zeros(1)}, {}, LossWeights())


def test_min_snr_weights() -> None:
    alphas = torch.tensor([0.99, 0.5, 0.01])
    snr = alphas / (1 - alphas)  # 99, 1, 0.0101
    eps = min_snr_weights(alphas, torch.tensor([0, 1, 2]), 5.0, "epsilon")
    torch.testing.assert_close(eps, torch.tensor([5.0 / 99.0, 1.0, 1.0]))
    v = min_snr_weights(alphas, torch.tensor([0, 1, 2]), 5.0, "v_prediction")
    torch.testing.assert_close(v, torch.tensor([5.0 / 100.0, 1.0 / 2.0, float(snr[2] / (snr[2] + 1))]))
    with pytest.raises(NotImplementedError, match="min_snr_gamma=None"):
        min_snr_weights(alphas, torch.tensor([0]), 5.0, "sample")
