"""PSNR and SSIM: equal images are perfect, noise lowers both by the textbook amounts, bad input is named."""

import math

import numpy as np
import pytest

from attnsurgery.reference.closeness import mean_closeness, psnr, ssim


def test_equal_images_are_perfect_and_floats_equal_their_bytes():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert psnr(image, image) == math.inf and ssim(image, image) == pytest.approx(1.0)
    assert psnr(image, image.astype(np.float32) / 255) == math.inf


def test_psnr_of_a_known_error():
    a = np.full((16, 16, 3), 100, dtype=np.uint8)
    b = a + 10  # MSE 100 -> 10 log10(255^2 / 100) dB
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100))


def test_ssim_falls_with_noise_and_ignores_a_constant_offset_less_than_noise():
    rng = np.random.default_rng(1)
    base = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((4, 4, 1))).astype(np.uint8)  # 32 px blocks
    noisy = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    slightly = np.clip(base + rng.normal(0, 5, base.shape), 0, 255).astype(np.uint8)
    assert ssim(base, noisy) < ssim(base, slightly) < 1.0
    assert psnr(base, noisy) < psnr(base, slightly)
    mean_psnr, mean_ssim = mean_closeness([noisy, slightly], [base, base])
    assert mean_psnr == pytest.approx((psnr(base, noisy) + psnr(base, slightly)) / 2)
    assert mean_ssim == pytest.approx((ssim(base, noisy) + ssim(base, slightly)) / 2)


def test_bad_input_is_named():
    a = np.zeros((16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="one size"):
        psnr(a, np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="at least 11 px"):
        ssim(a[:8, :8], a[:8, :8])
    with pytest.raises(ValueError, match="as many images as references"):
        mean_closeness([a], [])
