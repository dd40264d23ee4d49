"""ConvFusion speed on CPU: the pyramid conv block vs SDPA self-attention, per module and in a full UNet.

Part 1 (per module): SD1.5 top-level shapes (320 channels, 8 heads) for 512^2, 1024^2 and 2048^2 images
(latent grids 64^2, 128^2, 256^2), batch 1 (the paper counts batch 2, classifier-free guidance: double
our FLOPs to compare). The attention
side is a diffusers ``Attention`` module (q/k/v/out projections + ``F.scaled_dot_product_attention``), the
conv side a ``PyramidConvBlock`` with the largest SD1.5 top-level kernel (11). FLOPs are counted
analytically at 2 per multiply-add.

Part 2 (end to end): one call of a real-size SD1.5 UNet (random weights) with every ``attn1`` replaced by
ConvFusion blocks vs the plain UNet.

Usage: python benchmarks/bench_convfusion.py [--sizes 512 1024 2048] [--unet-sizes 512] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from attnsurgery.ops.pyramid_conv import PyramidConvBlock

CHANNELS, HEADS, BATCH, KERNEL = 320, 8, 1, 11


def attention_flops(tokens: int, channels: int) -> float:
    """q, k, v, out projections (4 N C^2 MACs) + QK^T and AV (2 N^2 C MACs), per image."""
    return 2.0 * (4 * tokens * channels**2 + 2 * tokens**2 * channels)


def conv_block_flops(height: int, width: int, channels: int, kernel: int, scales=(1.0, 0.5)) -> float:
    """1x1 C -> C/2, depthwise k x k per scale over C/2 channels, 1x1 C/2 -> C, pool branch C -> C.
    Pooling, gating and upsampling are a few ops per element and not counted (as for softmax above)."""
    tokens = height * width
    macs = tokens * channels * channels // 2 + tokens * channels // 2 * channels + channels**2
    for scale in scales:
        macs += int(height * scale) * int(width * scale) * channels // 2 * kernel**2
    return 2.0 * macs


def seconds(fn: Callable[[], object], min_repeats: int = 1, budget_s: float = 5.0) -> float:
    """Median wall time of fn after one warm-up call, repeated while within the time budget. A first call
    longer than ``budget_s`` is the measurement itself (start-up costs vanish next to minutes of maths)."""
    with torch.inference_mode():
        start = time.perf_counter()
        fn()
        first = time.perf_counter() - start
        if first > budget_s:
            return first
        repeats = max(min_repeats, min(10, int(budget_s / max(first, 1e-6))))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def per_module(sizes: list[int]) -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attention = Attention(CHANNELS, heads=HEADS, dim_head=CHANNELS // HEADS, processor=AttnProcessor2_0())
    attention.eval()
    block = PyramidConvBlock(CHANNELS, kernel_size=KERNEL).eval()
    print(
        f"\nPer module, SD1.5 top level ({CHANNELS} ch, {HEADS} heads), batch {BATCH}, fp32, "
        f"{torch.get_num_threads()} threads, conv kernel {KERNEL}"
    )
    print("| image | tokens | SDPA GFLOP | conv GFLOP | FLOP ratio | SDPA ms | conv ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for size in sizes:
        side = size // 8
        tokens = torch.randn(BATCH, side * side, CHANNELS)
        attn_flops = BATCH * attention_flops(side * side, CHANNELS)
        conv_flops = BATCH * conv_block_flops(side, side, CHANNELS, KERNEL)
        attn_s = seconds(lambda tokens=tokens: attention(tokens))
        conv_s = seconds(lambda tokens=tokens, side=side: block(tokens, (side, side)), min_repeats=3)
        print(
            f"| {size}^2 | {side * side} | {attn_flops / 1e9:,.1f} | {conv_flops / 1e9:,.2f} | "
            f"{attn_flops / conv_flops:,.0f}x | {attn_s * 1e3:,.1f} | {conv_s * 1e3:,.1f} | "
            f"{attn_s / conv_s:,.1f}x |",
            flush=True,
        )


def _sd15_unet() -> torch.nn.Module:
    """SD1.5's UNet architecture (diffusers' defaults + 768-wide text), random N(0, 0.02) weights, built on
    the meta device first so the 860M parameters are written once."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
    unet.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in unet.parameters():
            param.normal_(0.0, 0.02, generator=generator)
        for buffer in unet.buffers():
            buffer.zero_()
    return unet.eval().requires_grad_(False)


def unet_call(size: int) -> None:
    import attnsurgery as surg

    unet = _sd15_unet()
    side = size // 8
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(BATCH, 4, side, side, generator=generator)
    text = torch.randn(BATCH, 77, 768, generator=generator)
    plain_s = seconds(lambda: unet(sample, 500, text), budget_s=30)
    handle = surg.apply(unet, surg.ConvFusion())
    conv_s = seconds(lambda: unet(sample, 500, text), budget_s=30)
    info, blocks = handle.model, surg.ConvFusion.extract(unet).blocks
    handle.remove()
    attn_flops = conv_flops = 0.0
    for layer in info.layers:
        if layer.path in blocks:
            h, w = info.token_grid(layer, (side, side))
            attn_flops += BATCH * attention_flops(h * w, layer.heads * layer.head_dim)
            conv_flops += BATCH * conv_block_flops(h, w, blocks[layer.path].channels, blocks[layer.path].kernel_size)
    print(
        f"\nSD1.5 UNet (random weights), one call, {size}^2, batch {BATCH}, fp32, {torch.get_num_threads()} "
        f"threads; {len(blocks)} attn1 layers replaced"
    )
    print("| image | attn1 GFLOP | conv GFLOP | plain UNet s | ConvFusion UNet s | speed-up |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {size}^2 | {attn_flops / 1e9:,.1f} | {conv_flops / 1e9:,.2f} | {plain_s:,.2f} | {conv_s:,.2f} | "
        f"{plain_s / conv_s:,.2f}x |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[512, 1024, 2048])
    parser.add_argument("--unet-sizes", type=int, nargs="*", default=[512])
    parser.add_argument("--threads", type=int, default=2, help="1 is faster on a busy shared CPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    per_module(args.sizes)
    for size in args.unet_sizes:
        unet_call(size)


if __name__ == "__main__":
    main()
