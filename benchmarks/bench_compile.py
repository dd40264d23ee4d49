"""torch.compile over patched U-Nets: eager and compiled step time and compile time per plugin, in one run.

Each row applies one plugin to a bare U-Net, times ``--repeats`` eager denoiser calls, then compiles the
patched U-Net (``fullgraph=True``, fresh dynamo caches per row) and times the first call (compile time) and
``--repeats`` more. Ratios are against the plain U-Net of the same run, eager and compiled. The call is an
early step (t = 999), where HiDiffusion's RAU-Net and AgentSD's first phase act.

Models: the tiny SD1.5 tree of the tests, and an SD1.5-width U-Net (320/640/1280/1280 channels, 768-dim text)
with one layer per block (random weights) at a 64 x 64 latent (512 px; HiDiffusion forced).

Usage:
    python benchmarks/bench_compile.py                      # both models, inductor
    python benchmarks/bench_compile.py --model tiny --backend aot_eager
    python benchmarks/bench_compile.py --smoke              # tiny model, eager backend, seconds
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel
from timing import median_seconds

import attnsurgery as surg
from attnsurgery.testing.tiny import tiny_sd15

ROWS: dict[str, Callable[[], list[surg.Plugin]]] = {
    "plain": lambda: [],
    "hidiffusion": lambda: [surg.HiDiffusion(force=True)],
    "tome": lambda: [surg.TokenMerging(ratio=0.5)],
    "agent": lambda: [surg.AgentAttention()],
    "pag": lambda: [surg.PerturbedAttention(scale=3.0, layers="up_blocks.3.attentions.0")],
    "convfusion": lambda: [surg.ConvFusion()],
}


def sd15_width_unet() -> UNet2DConditionModel:
    """SD1.5's widths and heads with one resnet/transformer pair per block (a quarter of the layers)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=1,
        cross_attention_dim=768,
        attention_head_dim=8,
    ).eval()


def build(model: str) -> tuple[UNet2DConditionModel, tuple[torch.Tensor, ...]]:
    """The U-Net and one CFG-batch call's arguments (sample, timestep, text)."""
    if model == "tiny":
        unet, side, text = tiny_sd15().unet, 16, 32
    else:
        unet, side, text = sd15_width_unet(), 64, 768
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, side, side, generator=generator)
    return unet.requires_grad_(False), (sample, torch.tensor(999), torch.randn(2, 77, text, generator=generator))


def measure(unet: torch.nn.Module, call: tuple[torch.Tensor, ...], backend: str, repeats: int) -> tuple[float, ...]:
    """(eager step s, compile s, compiled step s) of the U-Net as it is patched now."""
    with torch.no_grad():
        eager = median_seconds(lambda: unet(*call), repeats)
        torch._dynamo.reset()
        compiled = torch.compile(unet, backend=backend, fullgraph=True)
        start = time.perf_counter()
        compiled(*call)
        compile_s = time.perf_counter() - start
        step = median_seconds(lambda: compiled(*call), repeats, warmup=0)
    return eager, compile_s, step


def table(model: str, backend: str, repeats: int, rows: list[str]) -> list[str]:
    unet, call = build(model)
    lines = [
        f"{model} U-Net, backend {backend}, latent {tuple(call[0].shape)}, median of {repeats}",
        f"{'plugin':12s} {'eager s':>9s} {'compiled s':>11s} {'compile s':>10s} {'eager/plain':>12s} "
        f"{'comp/plain':>11s} {'speed-up':>9s}",
    ]
    base: tuple[float, ...] | None = None
    for row in rows:
        with surg.patched(unet, *ROWS[row]()):
            eager, compile_s, step = measure(unet, call, backend, repeats)
        base = base or (eager, compile_s, step)
        lines.append(
            f"{row:12s} {eager:9.4f} {step:11.4f} {compile_s:10.2f} {eager / base[0]:12.2f} "
            f"{step / base[2]:11.2f} {eager / step:9.2f}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "sd15-width", "both"], default="both")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, eager)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="plugin rows (plain first)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, eager backend, one repeat")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = ["plain", *(row for row in args.rows if row != "plain")]
    models = ["tiny", "sd15-width"] if args.model == "both" else [args.model]
    if args.smoke:
        models, args.backend, args.repeats = ["tiny"], "eager", 1
    for model in models:
        print("\n".join(table(model, args.backend, args.repeats, rows)), end="\n\n")


if __name__ == "__main__":
    main()
