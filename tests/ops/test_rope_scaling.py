"""RoPE scaling: plain bands equal diffusers' FLUX embedding, NTK equals diffusers' ntk_factor, YaRN's blend."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from attnsurgery.ops.rope_scaling import BETA_HIGH, BETA_LOW, ScaledRope, rotary_bands, yarn_temperature

POSITIONS = torch.arange(40, dtype=torch.float32)


def _diffusers(dim: int, theta: float, ntk_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    return get_1d_rotary_pos_embed(
        dim,
        POSITIONS,
        theta=theta,
        use_real=True,
        repeat_interleave_real=True,
        freqs_dtype=torch.float64,
        ntk_factor=ntk_factor,
    )


def test_plain_bands_equal_diffusers():
    for got, want in zip(rotary_bands(POSITIONS, 56, 10000.0), _diffusers(56, 10000.0), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_ntk_scales_theta_by_alpha_to_the_dim_over_dim_minus_two():
    alpha, dim = 2.0, 56
    want = _diffusers(dim, 10000.0, ntk_factor=alpha ** (dim / (dim - 2)))
    got = rotary_bands(POSITIONS, dim, 10000.0, alpha, "ntk")
    assert not torch.allclose(got[0], _diffusers(dim, 10000.0)[0])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_yarn_keeps_fast_bands_and_interpolates_slow_ones():
    alpha, dim, native, theta = 2.0, 56, 256, 10000.0  # the fastest bands turn > 32 times over 256 tokens
    cos, _ = rotary_bands(POSITIONS, dim, theta, alpha, "yarn", native)
    plain, _ = rotary_bands(POSITIONS, dim, theta)
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    turns = native * freqs / (2 * math.pi)
    fast, slow = int((turns > BETA_HIGH).nonzero()[-1]), int((turns < BETA_LOW).nonzero()[0])
    assert torch.equal(cos[:, 2 * fast], plain[:, 2 * fast])  # many turns per native side: unchanged
    interpolated = torch.cos(POSITIONS.double() * freqs[slow] / alpha).float()
    torch.testing.assert_close(cos[:, 2 * slow], interpolated, rtol=0, atol=1e-6)


def test_scaled_rope_calls_the_original_at_native_size_and_stretches_above_it():
    original = FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6])
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1)
    ids = ids.reshape(-1, 3)
    alphas = {1: 1.0, 2: 1.0}
    rope = ScaledRope(original, "yarn", {1: 4, 2: 4}, lambda: alphas)
    for got, want in zip(rope(ids), original(ids), strict=True):
        assert torch.equal(got, want)
    alphas.update({1: 2.0, 2: 2.0})
    cos, sin = rope(ids)
    cos_plain, _ = original(ids)
    assert not torch.allclose(cos, cos_plain)
    torch.testing.assert_close(cos[0, :4], cos_plain[0, :4] * yarn_temperature(2.0))  # index axis: temperature only


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="rope must be one of"):
        ScaledRope(FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6]), "linear", {}, dict)
