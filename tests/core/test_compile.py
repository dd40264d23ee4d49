"""torch.compile over patched denoisers: every plugin compiles with fullgraph=True, equals eager, and one
whole generation compiles a small, stated number of graphs; apply accepts compiled denoisers.

The cheap ``eager`` backend keeps these fast: what is tested is dynamo's capture (graph breaks, guards,
recompiles), which every backend shares.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

import attnsurgery as surg
from attnsurgery.testing import tiny
from tests.support import dit_families

STEPS = 4  # more steps than any plugin has phases, so a graph per step would show
SIZE = 64
TOP = "up_blocks.3.attentions.0"  # 8 x 8 tokens at 64 px (the mid block's single token is never perturbed)

# Graphs one generation compiles: one per phase a plugin's per-call choices go through (documented in
# docs/compile.md); steps, random shifts and seeds change tensors, never the graph.
UNET_CASES = {
    "hidiffusion": (lambda: surg.HiDiffusion(force=True), 2),  # RAU-Net on, then off
    "tome": (lambda: surg.TokenMerging(ratio=0.5), 1),
    "agent": (lambda: surg.AgentAttention(), 2),  # AgentSD's two phases
    "pag-layers": (lambda: surg.PerturbedAttention(scale=3.0, layers=TOP), 1),
    "pag-heads": (lambda: surg.PerturbedAttention(scale=3.0, heads=[f"{TOP}.transformer_blocks.0.attn1:1,3"]), 1),
    "pag-sequential": (lambda: surg.PerturbedAttention(scale=3.0, layers=TOP, mode="sequential"), 1),
    "convfusion": (lambda: surg.ConvFusion(), 1),
}
DIT_CASES = {
    "tome": (lambda: surg.TokenMerging(ratio=0.5), 1),
    "agent": (lambda: surg.AgentAttention(), 2),
    "pag": (lambda: surg.PerturbedAttention(scale=3.0), 1),
    "neighborhood-flex": (lambda: surg.NeighborhoodAttention(force=True, window=2), 1),  # auto picks flex
    "neighborhood-tiles": (lambda: surg.NeighborhoodAttention(force=True, window=2, backend="tiles"), 1),
}
# Where a family needs more graphs than DIT_CASES says: shapes, not steps.
DIT_GRAPHS = {
    # True CFG in separate calls (FLUX, Chroma): the conditional call carries the perturbed row, a second shape.
    ("flux", "pag"): 2,
    ("chroma", "pag"): 2,
    # Qwen-Image's two CFG calls carry texts of their own lengths (8 and 6 tokens here): one more graph, after which
    # dynamo makes the length dynamic (so agents' second phase adds one graph, not two).
    **{("qwenimage", case): graphs + 1 for case, (_, graphs) in DIT_CASES.items()},
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _latents(pipe, **kwargs) -> torch.Tensor:
    extra = {"max_sequence_length": 16} if hasattr(pipe, "transformer") else {}
    return pipe(
        prompt="a red cube",
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        output_type="latent",
        **extra,
        **kwargs,
    ).images


def _compiled_run(pipe, role: str, **kwargs) -> tuple[torch.Tensor, int]:
    """One generation with the denoiser compiled (fullgraph) after the plugins were applied, and the graphs its
    compile captured (not those of kernels compiled at run time, as FlexAttention's)."""
    denoiser = getattr(pipe, role)
    graphs = CompileCounter()  # the eager backend, counting
    setattr(pipe, role, torch.compile(denoiser, backend=graphs, fullgraph=True))
    try:
        return _latents(pipe, **kwargs), graphs.frame_count
    finally:
        setattr(pipe, role, denoiser)


@pytest.mark.parametrize("case", list(UNET_CASES))
def test_unet_plugins_compile_without_breaks(case):
    make, max_graphs = UNET_CASES[case]
    pipe = tiny.tiny_sd15()
    pipe.set_progress_bar_config(disable=True)
    plain = _latents(pipe)
    with surg.patched(pipe, make()):
        eager = _latents(pipe)
        compiled, graphs = _compiled_run(pipe, "unet")
    assert (eager - plain).abs().max() > 1e-4, "the plugin must act here, or the test proves nothing"
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert sum(counters["graph_break"].values()) == 0
    assert 1 <= graphs <= max_graphs, f"{graphs} graphs for {STEPS} steps"


@pytest.mark.parametrize("family", list(dit_families.FAMILIES))
@pytest.mark.parametrize("case", list(DIT_CASES))
def test_dit_plugins_compile_without_breaks(family, case):
    make, max_graphs = DIT_CASES[case]
    max_graphs = DIT_GRAPHS.get((family, case), max_graphs)
    pipe = dit_families.build(family)
    kwargs = dit_families.FAMILIES[family][1]
    plain = _latents(pipe, **kwargs)
    with surg.patched(pipe, make()):
        eager = _latents(pipe, **kwargs)
        compiled, graphs = _compiled_run(pipe, "transformer", **kwargs)
    assert (eager - plain).abs().max() > 1e-4, "the plugin must act here, or the test proves nothing"
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert sum(counters["graph_break"].values()) == 0
    assert 1 <= graphs <= max_graphs, f"{graphs} graphs for {STEPS} steps"


def test_apply_to_a_compiled_denoiser_that_already_ran():
    """The compiled code from before apply must not keep running: HiDiffusion's RAU-Net adds only hooks on
    submodules (no processor changes a guard could see), and remove() must bring back the plain output."""
    pipe = tiny.tiny_sd15()
    pipe.set_progress_bar_config(disable=True)
    plugin = surg.HiDiffusion(window_attn=False, force=True)
    plain = _latents(pipe)
    with surg.patched(pipe, plugin):
        eager = _latents(pipe)
    assert (eager - plain).abs().max() > 1e-4, "RAU-Net must act here, or apply-after-compile proves nothing"
    unet = pipe.unet
    processors = dict(unet.attn_processors)
    pipe.unet = torch.compile(pipe.unet, backend="eager", fullgraph=True)
    torch.testing.assert_close(_latents(pipe), plain)  # compiled and cached before apply
    handle = surg.apply(pipe, plugin)
    assert handle.denoiser is unet
    torch.testing.assert_close(_latents(pipe), eager, rtol=1e-5, atol=1e-5)
    handle.remove()
    assert all(unet.attn_processors[name] is proc for name, proc in processors.items())
    torch.testing.assert_close(_latents(pipe), plain)
    assert sum(counters["graph_break"].values()) == 0


@pytest.mark.parametrize("in_place", [False, True], ids=["torch.compile", "module.compile"])
def test_apply_to_a_bare_compiled_denoiser(in_place):
    """A bare compiled denoiser (the OptimizedModule, or a module compiled in place) whose compiled code already
    ran: apply works on the original module, the next call runs the plugin, remove() brings back the plain one."""
    unet = tiny.tiny_sd15().unet
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    plain = unet(sample, 500, text).sample
    with surg.patched(unet, surg.TokenMerging(ratio=0.5)):
        merged = unet(sample, 500, text).sample
    assert (merged - plain).abs().max() > 1e-4
    if in_place:
        unet.compile(backend="eager", fullgraph=True)
    compiled = unet if in_place else torch.compile(unet, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(sample, 500, text).sample, plain)
    with surg.patched(compiled, surg.TokenMerging(ratio=0.5)) as handle:
        assert handle.denoiser is unet
        torch.testing.assert_close(compiled(sample, 500, text).sample, merged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled(sample, 500, text).sample, plain)


def test_benchmark_smoke():
    """``benchmarks/bench_compile.py --smoke``: plain and one plugin row, eager and compiled, ratios vs plain."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_compile.py"
    result = subprocess.run(
        [sys.executable, str(script), "--smoke", "--rows", "pag"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:] if line.strip()}
    assert set(rows) == {"plain", "pag"} and float(rows["plain"][3]) == 1.0
