"""perturb_heads against explicit float64 attention maps: every kind, soft weights, per-row head sets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnsurgery.ops.perturb import KINDS, head_pairs, perturb_heads

B, H, N, D = 3, 4, 24, 8


def _inputs(seed: int = 0, n: int = N, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=dtype) * 1.5 for _ in range(3))
    return q, k, v, F.scaled_dot_product_attention(q, k, v)


def _weights() -> torch.Tensor:
    """Each row carries its own head weights, including soft ones and untouched heads."""
    return torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.25, 0.0], [0.0, 0.5, 0.0, 1.0]])


def _reference(q, k, v, weights, kind, temperature=None, image=None, keys=None):
    """o = ((1 - u) A + u P) V with explicit float64 maps [B, H, N, N]; `keys` [B, N] masks keys out."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.shape[-1])
    n = q.shape[-2]
    logits = q @ k.transpose(-1, -2) * scale
    if keys is not None:
        logits = logits.masked_fill(~keys[:, None, None, :], float("-inf"))
    a = logits.softmax(-1)
    if image is not None:
        mask = torch.zeros(n, n, dtype=torch.float64)
        mask[image, image] = float("-inf")
        idx = torch.arange(n)[image]
        mask[idx, idx] = 0.0
        p = (logits + mask).softmax(-1)
    elif kind == "identity":
        p = torch.eye(n, dtype=torch.float64).expand_as(a)
    elif kind == "uniform":
        p = torch.full_like(a, 1.0 / n)
    elif kind == "mean_query":
        qm = q.mean(-2, keepdim=True)
        p = (qm @ k.transpose(-1, -2) * scale).softmax(-1).expand_as(a)
    else:
        p = (logits / temperature).softmax(-1)
    u = weights.double()[:, :, None, None]
    return ((1 - u) * a + u * p) @ v


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_matches_float64_map_reference(kind):
    q, k, v, out = _inputs()
    w = _weights()
    rows, heads, u = head_pairs(w)
    new = perturb_heads(q, k, v, out, rows, heads, u, kind, temperature=2.5)
    ref = _reference(q, k, v, w, kind, temperature=2.5)
    assert (ref - _reference(q, k, v, torch.zeros_like(w), kind, 2.5)).abs().max() > 0.1  # non-trivial
    torch.testing.assert_close(new.double(), ref, atol=2e-5, rtol=1e-5)
    q64, k64, v64, out64 = (t.double() for t in (q, k, v, out))
    out64 = F.scaled_dot_product_attention(q64, k64, v64)
    new64 = perturb_heads(q64, k64, v64, out64, rows, heads, u, kind, temperature=2.5)
    torch.testing.assert_close(new64, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("image", [slice(0, 16), slice(8, 24), slice(0, 24)])
def test_image_only_identity_matches_masked_map(image):
    """SD3 order [image, text], FLUX order [text, image], and no text tokens at all."""
    q, k, v, out = _inputs(1)
    w = _weights()
    new = perturb_heads(q, k, v, out, *head_pairs(w), "identity", image_tokens=image)
    ref = _reference(q, k, v, w, "identity", image=image)
    assert (ref - _reference(q, k, v, torch.zeros_like(w), "identity")).abs().max() > 0.1
    torch.testing.assert_close(new.double(), ref, atol=2e-5, rtol=1e-5)
    text = [i for i in range(N) if not image.start <= i < image.stop]
    assert torch.equal(new[:, :, text], out[:, :, text])


@pytest.mark.parametrize("image", [slice(0, 16), slice(8, 24)])
def test_image_only_identity_keeps_masked_text_keys_out(image):
    """Chroma masks T5 padding, Z-Image the batch padding: those text keys stay out of the perturbed map."""
    q, k, v, _ = _inputs(4)
    keys = torch.ones(B, N, dtype=torch.bool)
    text = [i for i in range(N) if not image.start <= i < image.stop]
    keys[1, text[-3:]] = False
    keys[2, text[:2]] = False
    mask = keys[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    w = _weights()
    new = perturb_heads(q, k, v, out, *head_pairs(w), image_tokens=image, attn_mask=mask)
    ref = _reference(q, k, v, w, "identity", image=image, keys=keys)
    assert (ref - _reference(q, k, v, w, "identity", image=image)).abs().max() > 1e-2  # the mask matters
    torch.testing.assert_close(new.double(), ref, atol=2e-5, rtol=1e-5)
    additive = torch.zeros(B, 1, 1, N).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(perturb_heads(q, k, v, out, *head_pairs(w), image_tokens=image, attn_mask=additive), new)


def test_image_only_identity_is_stable_for_large_logits():
    q, k, v, out = _inputs(2)
    q, k = q * 30, k * 30
    out = F.scaled_dot_product_attention(q, k, v)
    w = torch.ones(B, H)
    new = perturb_heads(q, k, v, out, *head_pairs(w), image_tokens=slice(0, 16))
    assert torch.isfinite(new).all()
    torch.testing.assert_close(
        new.double(), _reference(q, k, v, w, "identity", image=slice(0, 16)), atol=1e-4, rtol=1e-4
    )


def test_unselected_pairs_are_bit_identical_and_full_identity_is_exact():
    q, k, v, out = _inputs(3)
    w = _weights()
    new = perturb_heads(q, k, v, out, *head_pairs(w), "identity")
    untouched = w == 0
    assert torch.equal(new[untouched], out[untouched])
    assert torch.equal(new[w == 1], v[w == 1])  # PAG: exactly V, as diffusers' identity processor
    assert not torch.equal(new[w == 0.25], out[w == 0.25])


def test_no_pairs_returns_output_and_input_is_not_modified():
    q, k, v, out = _inputs(4)
    before = out.clone()
    assert perturb_heads(q, k, v, out, *head_pairs(torch.zeros(B, H)), "uniform") is out
    perturb_heads(q, k, v, out, *head_pairs(torch.ones(B, H)), "uniform")
    assert torch.equal(out, before)


def test_inplace_writes_the_same_result_into_out():
    q, k, v, out = _inputs(7)
    pairs = head_pairs(_weights())
    expected = perturb_heads(q, k, v, out, *pairs, "mean_query")
    assert perturb_heads(q, k, v, out, *pairs, "mean_query", inplace=True) is out
    assert torch.equal(out, expected)


def test_zero_weight_pairs_are_bit_identical():
    """Explicit zero weights (e.g. a batched head set with soft=0 entries) leave the output untouched."""
    q, k, v, out = _inputs(5)
    rows, heads = torch.tensor([0, 1]), torch.tensor([2, 3])
    new = perturb_heads(q, k, v, out, rows, heads, torch.zeros(2), "temperature", temperature=3.0)
    assert torch.equal(new, out)


def test_scale_of_the_original_call_is_used():
    q, k, v, _ = _inputs(6)
    out = F.scaled_dot_product_attention(q, k, v, scale=0.05)
    w = torch.ones(B, H)
    new = perturb_heads(q, k, v, out, *head_pairs(w), "temperature", scale=0.05, temperature=1.0)
    torch.testing.assert_close(new, out)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kind="blur"), "unknown perturbation kind"),
        (dict(kind="temperature"), "temperature > 0"),
        (dict(kind="uniform", image_tokens=slice(0, 4)), "supports kind='identity' only"),
        (dict(image_tokens=slice(0, 99)), "must lie inside"),
    ],
)
def test_bad_input_names_the_problem(kwargs, message):
    q, k, v, out = _inputs()
    with pytest.raises(ValueError, match=message):
        perturb_heads(q, k, v, out, *head_pairs(torch.ones(B, H)), **kwargs)


def test_identity_needs_self_attention():
    q, _, _, _ = _inputs()
    k = v = torch.randn(B, H, 7, D)
    out = F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="self-attention"):
        perturb_heads(q, k, v, out, *head_pairs(torch.ones(B, H)))
