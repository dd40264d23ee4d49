"""TokenMerging on every DiT family: image tokens merged inside the joint attention call, text never."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import attnsurgery as surg
from attnsurgery import PerturbedAttention, TokenMerging
from attnsurgery.testing import restore
from attnsurgery.testing.tiny import tiny_sd15
from tests.support.benchmarks import run_benchmark
from tests.support.dit_families import FAMILIES, build, latents


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_pipe(request):
    return request.param, build(request.param)


def _with(pipe, name, *plugins, **kwargs) -> torch.Tensor:
    with surg.patched(pipe, *plugins):
        return latents(pipe, name, **kwargs)


@pytest.mark.parametrize("mode", ["kv", "qkv"])
def test_every_family_merges_and_restores_exactly(family_pipe, mode):
    name, pipe = family_pipe
    plain = latents(pipe, name)  # first: diffusers and transformers add attributes lazily on a first call
    before = restore.snapshot(pipe)
    merged = _with(pipe, name, TokenMerging(ratio=0.5, mode=mode))
    assert (merged - plain).abs().max() > 1e-4 * plain.abs().max()
    restore.assert_restored(pipe, before)
    assert torch.equal(latents(pipe, name), plain)
    assert torch.equal(_with(pipe, name, TokenMerging(ratio=0.0, mode=mode)), plain)  # ratio 0: untouched


def test_the_attention_call_shrinks_by_the_merged_image_tokens():
    """FLUX at 128 px: 8 x 8 image tokens; ratio 0.5 merges 32 of them out of each layer's keys (kv) and its
    queries too (qkv); the text keys are all still there."""
    pipe = build("flux")

    def shapes(mode):
        with surg.patched(pipe, TokenMerging(ratio=0.5, mode=mode)), SdpaShapes() as seen:
            pipe.transformer(**_flux_call(pipe))
        return set(seen.shapes)

    text = 16
    assert shapes("kv") == {(text + 64, text + 32)}
    assert shapes("qkv") == {(text + 32, text + 32)}


class SdpaShapes(TorchFunctionMode):
    """Records (queries, keys) of every SDPA call made while active, the merged calls included."""

    def __enter__(self):
        self.shapes = []
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.shapes.append((args[0].shape[2], args[1].shape[2]))
        return func(*args, **(kwargs or {}))


def _flux_call(pipe) -> dict:
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1)
    config = pipe.transformer.config
    return dict(
        hidden_states=torch.randn(1, 64, config.in_channels),
        encoder_hidden_states=torch.randn(1, 16, config.joint_attention_dim),
        pooled_projections=torch.randn(1, config.pooled_projection_dim),
        timestep=torch.tensor([0.5]),
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(16, 3),
    )


def test_composes_with_head_level_perturbation():
    pipe = build("flux")
    pag = PerturbedAttention(scale=3.0, heads=["transformer_blocks.0.attn:0"])
    both = _with(pipe, "flux", TokenMerging(ratio=0.5), pag)
    assert not torch.equal(both, _with(pipe, "flux", TokenMerging(ratio=0.5)))
    assert not torch.equal(both, _with(pipe, "flux", pag))


def test_kv_mode_on_a_unet_and_a_bad_mode_are_refused():
    with pytest.raises(ValueError, match="mode='kv' merges keys inside a DiT"):
        surg.apply(tiny_sd15(), TokenMerging(mode="kv"))
    with pytest.raises(ValueError, match="mode='kvq' is invalid"):
        TokenMerging(mode="kvq")


@pytest.mark.slow
def test_the_layer_benchmark_runs_with_tiny_shapes():
    """``benchmarks/bench_token_merging_dit.py --smoke``: dense and both modes at every ratio, in seconds."""
    table = run_benchmark("bench_token_merging_dit.py", "--smoke").split("| --- |")[-1].splitlines()[1:]
    assert [row.split(" | ")[:2] for row in table] == [["| dense SDPA", "-"]] + [
        [f"| {mode}", f"{ratio:.2f}"] for ratio in (0.25, 0.5, 0.75) for mode in ("kv", "qkv")
    ]


@pytest.mark.slow
def test_the_denoiser_benchmark_runs_with_tiny_shapes():
    """``benchmarks/bench_dit_denoiser.py --smoke``: plain and every DiT plugin row, ratios against plain."""
    table = run_benchmark("bench_dit_denoiser.py", "--smoke").split("| setup |")[-1].splitlines()[2:]
    assert [row.split(" | ")[0] for row in table] == [
        "| plain",
        "| NeighborhoodAttention (native window)",
        "| NeighborhoodAttention, stride 4",
        "| TokenMerging 0.5 (qkv)",
        "| TokenMerging 0.5 (kv)",
        "| AgentAttention (agent phase)",
    ]
    assert table[0].endswith("| 1.00x |")
