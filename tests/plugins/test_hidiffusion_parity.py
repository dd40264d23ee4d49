"""Our HiDiffusion equals the `hidiffusion` 0.1.10 package on the tiny SD1.5 and SDXL pipelines.

Both run the same seeded pipeline; our window shifts (drawn from our private generator) are recorded
and replayed into the package, so any difference is a difference in RAU-Net or MSW-MSA itself.
Sizes keep every windowed grid even (the package resamples odd grids; we pad).
"""

from __future__ import annotations

import pytest
import torch

import attnsurgery as surg
from attnsurgery.plugins import hidiffusion as hidiffusion_plugin
from attnsurgery.testing import tiny
from tests.support.hidiffusion_peer import import_package, package_applied, run_latents

SIZE = 256  # the tiny models' native size, hence force=True below
# SD1.5: 5 steps -> RAD/RAU (T1 0.4) in steps 0-1; T2 0.2 (package dict patched to match) pools in step 0.
# SDXL: 7 steps, aggressive preset -> RAD/RAU in step 0, pool/unpool in step 1.
SETUPS = {"sd15": dict(steps=5, t2=0.2), "sdxl": dict(steps=7, t2=None)}
CASES = [(True, False), (False, True), (True, True)]


@pytest.fixture(scope="module")
def pipes():
    built = {"sd15": tiny.tiny_sd15(), "sdxl": tiny.tiny_sdxl()}
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    plain = {name: run_latents(pipe, SIZE, SETUPS[name]["steps"]) for name, pipe in built.items()}
    return built, plain


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("raunet,window_attn", CASES, ids=["raunet", "msw-msa", "both"])
def test_matches_the_package(family, raunet, window_attn, pipes, monkeypatch):
    built, plain = pipes
    pipe, setup = built[family], SETUPS[family]
    drawn: list[int] = []
    draw = hidiffusion_plugin.draw_shift_index
    monkeypatch.setattr(hidiffusion_plugin, "draw_shift_index", lambda g: drawn.append(draw(g)) or drawn[-1])
    plugin = surg.HiDiffusion(raunet=raunet, window_attn=window_attn, t2=setup["t2"], force=True, seed=3)
    with surg.patched(pipe, plugin):
        ours = run_latents(pipe, SIZE, setup["steps"])

    assert (ours - plain[family]).abs().max() > 1e-2, "HiDiffusion must change the output here"
    if window_attn:
        assert len(set(drawn)) > 1, "the replayed shifts should vary"
    _, package_module = import_package()
    if setup["t2"] is not None:
        monkeypatch.setitem(package_module.switching_threshold_ratio_dict["sd15_1024"], "T2_ratio", setup["t2"])
    with package_applied(pipe, family, raunet=raunet, window_attn=window_attn, shifts=drawn) as forced:
        theirs = run_latents(pipe, SIZE, setup["steps"])
    assert forced.calls == len(drawn)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
