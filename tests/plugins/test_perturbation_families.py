"""PerturbedAttention on the newer DiTs: FLUX.2, Qwen-Image (separate CFG calls, unpadded text), Z-Image (a list
batch [cond, uncond], image tokens first) and Chroma (separate CFG calls, an attention mask)."""

from __future__ import annotations

import pytest
import torch

import attnsurgery as surg
from attnsurgery import PerturbedAttention
from attnsurgery.testing import assert_restored, snapshot

FAMILIES = ("flux2", "qwenimage", "zimage", "chroma")
# (without CFG, with CFG) call arguments; FLUX.2-dev's pipeline has no CFG, only its guidance embedding
RUNS = {
    "flux2": (dict(guidance_scale=4.0), None),
    "qwenimage": (dict(true_cfg_scale=1.0), dict(true_cfg_scale=4.0, negative_prompt="blurry")),
    "zimage": (dict(guidance_scale=0.0), dict(guidance_scale=4.0)),
    "chroma": (dict(guidance_scale=1.0), dict(guidance_scale=4.0, negative_prompt="blurry")),
}


def _latents(pipe, steps: int = 1, prompt: str = "a red cube", **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    out = pipe(
        prompt=prompt,
        generator=generator,
        num_inference_steps=steps,
        height=64,
        width=64,
        max_sequence_length=16,
        output_type="latent",
        **kwargs,
    )
    return out.images


def _with(pipe, plugin, **kwargs) -> torch.Tensor:
    with surg.patched(pipe, plugin):
        return _latents(pipe, **kwargs)


def _runs(name: str) -> list[dict]:
    return [run for run in RUNS[name] if run is not None]


@pytest.mark.parametrize("name", FAMILIES)
def test_pag_changes_the_output_and_remove_restores_it_exactly(name, request):
    pipe = request.getfixturevalue(name)
    for run in _runs(name):
        plain = _latents(pipe, steps=2, **run)
        before = snapshot(pipe)
        handle = surg.apply(pipe, PerturbedAttention(scale=2.0))
        guided = _latents(pipe, steps=2, **run)
        handle.remove()
        assert (guided - plain).abs().max() > 1e-3
        assert_restored(pipe, before)
        assert torch.equal(_latents(pipe, steps=2, **run), plain)


@pytest.mark.parametrize("name", FAMILIES)
def test_heads_of_a_layer_equal_the_layer_and_one_head_differs(name, request):
    """Every head by path or (block, head) equals the whole layer; the default layer is the family's."""
    pipe = request.getfixturevalue(name)
    run = _runs(name)[-1]
    layer = "layers.1.attention" if name == "zimage" else "transformer_blocks.1.attn"
    block = surg.describe(pipe.transformer).layer(layer).block_index
    whole = _with(pipe, PerturbedAttention(layers=layer), **run)
    assert torch.equal(_with(pipe, PerturbedAttention(), **run), whole)
    by_path = _with(pipe, PerturbedAttention(heads=[f"{layer}:{h}" for h in range(4)]), **run)
    by_block = _with(pipe, PerturbedAttention(heads=[(block, h) for h in range(4)]), **run)
    assert torch.equal(by_path, whole) and torch.equal(by_block, whole)
    assert not torch.equal(_with(pipe, PerturbedAttention(heads=f"{layer}:2"), **run), whole)


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_equals_sequential(name, request):
    """The perturbed rows appended to the batch (Z-Image's latent and caption lists, Qwen-Image's img_shapes,
    Chroma's mask) give what a separate pass gives."""
    pipe = request.getfixturevalue(name)
    for run in _runs(name):
        batched = _with(pipe, PerturbedAttention(layers="all"), **run)
        sequential = _with(pipe, PerturbedAttention(layers="all", mode="sequential"), **run)
        torch.testing.assert_close(sequential, batched, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["zimage", "chroma"])
def test_the_term_is_the_same_with_cfg_and_without(name, request):
    """One flow-matching step is linear in the prediction: s (eps_c - eps_p) must appear unscaled by the CFG
    weight, so the conditional rows were found (Z-Image: the first half of its batch; Chroma: the first of
    two calls) and the unconditional prediction got the same shift. (Qwen-Image rescales its CFG result to
    the conditional prediction's norm: not linear.)"""
    pipe = request.getfixturevalue(name)
    plain_run, cfg_run = RUNS[name]
    for mode in ("batched", "sequential"):
        plugin = PerturbedAttention(scale=2.0, mode=mode)
        term_plain = _with(pipe, plugin, **plain_run) - _latents(pipe, **plain_run)
        term_cfg = _with(pipe, plugin, **cfg_run) - _latents(pipe, **cfg_run)
        assert term_plain.abs().max() > 1e-2
        torch.testing.assert_close(term_cfg, term_plain, atol=1e-5, rtol=1e-4)


def test_zimage_cfg_truncation_is_followed(zimage):
    """ZImagePipeline keeps do_classifier_free_guidance true but runs one-row batches once its cfg_truncation
    cuts CFG off (second step here): those rows are conditional, not half of a CFG batch."""
    run = dict(guidance_scale=4.0, cfg_truncation=0.3)
    batched = _with(zimage, PerturbedAttention(), steps=2, **run)
    sequential = _with(zimage, PerturbedAttention(mode="sequential"), steps=2, **run)
    assert (batched - _latents(zimage, steps=2, **run)).abs().max() > 1e-3
    torch.testing.assert_close(sequential, batched, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_image_only_on_every_layer(name, request):
    """joint='image_only' finds the image range from each layer's text placement (text first on the FLUX-likes
    and Qwen-Image, last on Z-Image); Z-Image's text-only context_refiner is never wrapped."""
    pipe = request.getfixturevalue(name)
    run = _runs(name)[-1]
    plain = _latents(pipe, **run)
    full = _with(pipe, PerturbedAttention(layers="all"), **run)
    with surg.patched(pipe, PerturbedAttention(layers="all", joint="image_only")) as handle:
        assert not any(site.startswith("context_refiner.") for site in handle.sites)
        image_only = _latents(pipe, **run)
    assert (image_only - plain).abs().max() > 1e-3 and (image_only - full).abs().max() > 1e-3
    assert torch.isfinite(image_only).all()


def test_text_only_layers_cannot_be_perturbed(zimage):
    with pytest.raises(ValueError, match="matches no attention layer of kind self/joint/single"):
        surg.apply(zimage, PerturbedAttention(layers="context_refiner"))
