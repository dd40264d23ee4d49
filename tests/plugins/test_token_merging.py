"""TokenMerging on the tiny pipelines: parity with tomesd, exact removal, SDXL's top level, randomness."""

from __future__ import annotations

import warnings

import pytest
import torch

import attnsurgery as surg
from attnsurgery.processors.token_merge import TokenMergeProcessor
from tests.support.pipes import run_pipe

NON_SQUARE = (64, 96)  # latent 8 x 12: the top level has 96 tokens


def effect(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("guidance,use_rand", [(7.5, False), (1.0, True)])
def test_equals_tomesd(sd15, guidance, use_rand):
    """CFG batch with a fixed dst choice; odd batch, where both force position 0 despite use_rand."""
    tomesd = pytest.importorskip("tomesd")
    base = run_pipe(sd15, size=NON_SQUARE, guidance_scale=guidance)
    with surg.patched(sd15, surg.TokenMerging(ratio=0.5, use_rand=use_rand)):
        ours = run_pipe(sd15, size=NON_SQUARE, guidance_scale=guidance)
    tomesd.apply_patch(sd15, ratio=0.5, use_rand=use_rand)
    try:
        theirs = run_pipe(sd15, size=NON_SQUARE, guidance_scale=guidance)
    finally:
        tomesd.remove_patch(sd15)
    assert effect(theirs, base) > 1e-2  # merging visibly changes the image
    assert effect(ours, theirs) < 1e-5


def test_remove_restores_bit_identical_output(sd15):
    unet = sd15.unet
    processors = dict(unet.attn_processors)
    hooks = {name: len(m._forward_pre_hooks) for name, m in unet.named_modules()}
    base = run_pipe(sd15, size=NON_SQUARE)
    handle = surg.apply(sd15, surg.TokenMerging(ratio=0.5, seed=1))
    merged = run_pipe(sd15, size=NON_SQUARE)
    handle.remove()
    assert effect(merged, base) > 1e-2
    assert torch.equal(run_pipe(sd15, size=NON_SQUARE), base)
    assert all(unet.attn_processors[name] is proc for name, proc in processors.items())
    assert {name: len(m._forward_pre_hooks) for name, m in unet.named_modules()} == hooks


def merged_blocks(unet: torch.nn.Module) -> list[str]:
    """U-Net blocks whose attention layers carry a token-merging processor."""
    found = {
        name.split(".attentions")[0]
        for name, proc in unet.attn_processors.items()
        if isinstance(proc, TokenMergeProcessor)
    }
    assert all(
        name.endswith("attn1.processor")
        for name, proc in unet.attn_processors.items()
        if isinstance(proc, TokenMergeProcessor)
    )
    return sorted(found)


def test_top_layers_by_family(sd15, sdxl):
    with surg.patched(sd15, surg.TokenMerging()):
        assert merged_blocks(sd15.unet) == ["down_blocks.0", "up_blocks.3"]
    base = run_pipe(sdxl)
    with surg.patched(sdxl, surg.TokenMerging()):
        touched = merged_blocks(sdxl.unet)
        merged = run_pipe(sdxl)
    assert touched == ["down_blocks.1", "up_blocks.1"]  # SDXL's 64x64 level (at 1024 px)
    assert effect(merged, base) > 1e-3  # unlike tomesd's default, it acts on SDXL
    with surg.patched(sdxl, surg.AgentAttention()):
        assert effect(run_pipe(sdxl), base) > 1e-3


def test_every_level_including_grids_smaller_than_a_cell(sd15):
    """At 64 px the lowest levels are 2x2 and 1x1 grids: too small for 4x4 cells, merged where possible."""
    base = run_pipe(sd15)
    with surg.patched(sd15, surg.TokenMerging(layers="all", sx=4, sy=4, ratio=0.5)):
        assert effect(run_pipe(sd15), base) > 1e-2


def test_random_dst_choice_is_private_and_seeded(sd15):
    runs = {}
    for seed in (1, 1, 2):
        state = torch.get_rng_state()
        with surg.patched(sd15, surg.TokenMerging(ratio=0.5, seed=seed)):
            runs.setdefault(seed, []).append(run_pipe(sd15, size=NON_SQUARE))
        assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert torch.equal(runs[1][0], runs[1][1])
    assert effect(runs[1][0], runs[2][0]) > 1e-4


def test_bad_configs_are_rejected(sd15):
    with pytest.raises(ValueError, match="ratio"):
        surg.TokenMerging(ratio=1.0)
    with pytest.raises(ValueError, match="sx"):
        surg.TokenMerging(sx=0)
    with pytest.raises(ValueError, match="a 1x1 cell is all destination"):
        surg.TokenMerging(sx=1, sy=1)
    with pytest.raises(ValueError, match="matches no attention layer"):
        surg.apply(sd15, surg.TokenMerging(layers="down_blocks.0.attentions.0.transformer_blocks.0.attn2"))
    assert surg.TokenMerging.from_dict(surg.TokenMerging(layers=["top"]).to_dict()) == surg.TokenMerging(
        layers=("top",)
    )


def test_a_ratio_of_the_wrong_type_is_named():
    with pytest.raises(ValueError, match="TokenMerging.ratio='0.5' must be a number in \\[0, 1\\)"):
        surg.TokenMerging(ratio="0.5")
    with pytest.raises(ValueError, match="TokenMerging.ratio=nan"):
        surg.TokenMerging(ratio=float("nan"))


def test_layers_of_the_wrong_type_are_named():
    with pytest.raises(ValueError, match="TokenMerging layers=123 is invalid"):
        surg.TokenMerging(layers=123)


def test_a_cell_larger_than_every_grid_warns_at_the_call(sd15):
    """At 64 px SD1.5's top level is 8x8 tokens: a 64x64 cell holds no dst, nothing would merge."""
    base = run_pipe(sd15)
    with surg.patched(sd15, surg.TokenMerging(sx=64, sy=64)):
        with pytest.warns(UserWarning, match=r"TokenMerging merges nothing at 64x64 px: its 64x64 \(sx x sy\) cell"):
            assert torch.equal(run_pipe(sd15), base)
    with surg.patched(sd15, surg.TokenMerging(layers="all", sx=4, sy=4)):  # the top level still merges: no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run_pipe(sd15)
