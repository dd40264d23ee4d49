"""End to end: a FLUX-shaped transformer at 2K, plain versus each DiT attention plugin, in one run.

Real FLUX.1 widths (24 heads x 128, MLP ratio 4, 512 text tokens) with only a few double- and single-stream
blocks (random weights; a full model has 19 + 38, so attention's share here is that of the real model), on
a 128 x 128 image-token grid (2048 px). Each setup runs one warm-up forward (compilation, BlockMask) and then
``--repeats`` timed forwards; the ratio is against plain in the same run.

Usage:
    python benchmarks/bench_dit_denoiser.py                  # 2K, 1 double + 2 single blocks
    python benchmarks/bench_dit_denoiser.py --grid 96 --single 1
    python benchmarks/bench_dit_denoiser.py --smoke          # tiny widths, seconds
"""

from __future__ import annotations

import argparse

import torch
from diffusers import FluxTransformer2DModel
from timing import median_seconds

import attnsurgery as surg

TEXT, HEADS, HEAD_DIM = 512, 24, 128


def flux_inputs(model: FluxTransformer2DModel, side: int, text: int) -> dict[str, torch.Tensor]:
    """One denoiser call's arguments for a ``side x side`` token grid (text first, FLUX's ids)."""
    config = model.config
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    return dict(
        hidden_states=torch.randn(1, side * side, config.in_channels),
        encoder_hidden_states=torch.randn(1, text, config.joint_attention_dim),
        pooled_projections=torch.randn(1, config.pooled_projection_dim),
        timestep=torch.tensor([0.5]),
        img_ids=img_ids,
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=128, help="image-token grid side (128: 2048 px)")
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="2 heads x 16, grid 24, 16 text tokens")
    parser.add_argument(
        "--rows",
        nargs="+",
        default=["na", "na-stride", "tome-qkv", "tome-kv", "agents"],
        help="plugin rows beside plain (na, na-stride, tome-qkv, tome-kv, agents)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    heads, head_dim, text, side = (2, 16, 16, 24) if args.smoke else (HEADS, HEAD_DIM, TEXT, args.grid)
    model = FluxTransformer2DModel(
        num_layers=args.double,
        num_single_layers=args.single,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=64 if args.smoke else 4096,
        pooled_projection_dim=32 if args.smoke else 768,
        axes_dims_rope=(4, 6, 6) if args.smoke else (16, 56, 56),
    ).eval()
    if args.smoke:  # native size 8 x 8 tokens, so the 24 x 24 grid is above it
        model.register_to_config(sample_size=16)
    inputs = flux_inputs(model, side, text)
    stride = 4 if args.smoke else 16
    rows_by_key = {
        "na": ("NeighborhoodAttention (native window)", (surg.NeighborhoodAttention(),)),
        "na-stride": (f"NeighborhoodAttention, stride {stride}", (surg.NeighborhoodAttention(stride=stride),)),
        "tome-qkv": ("TokenMerging 0.5 (qkv)", (surg.TokenMerging(ratio=0.5),)),
        "tome-kv": ("TokenMerging 0.5 (kv)", (surg.TokenMerging(ratio=0.5, mode="kv"),)),
        "agents": (
            "AgentAttention (agent phase)",
            (surg.AgentAttention(schedule=(surg.AgentPhase(1.0, 4, 4, 0.4, 0.95),)),),
        ),
    }
    unknown = set(args.rows) - set(rows_by_key)
    if unknown:
        parser.error(f"--rows: unknown {sorted(unknown)}; choose from {list(rows_by_key)}")
    setups = [("plain", ()), *(rows_by_key[key] for key in args.rows)]
    rows, plain = [], None
    with torch.inference_mode():
        for label, plugins in setups:
            with surg.patched(model, *plugins):
                took = median_seconds(lambda: model(**inputs), args.repeats)  # warm-up: compile, BlockMask
            plain = plain or took
            rows.append(f"| {label} | {took:.2f} | {plain / took:.2f}x |")
            print(rows[-1], flush=True)
    print(
        f"\nFLUX-shaped transformer, {args.double} double + {args.single} single blocks, {heads} heads x {head_dim}, "
        f"grid {side} x {side} + {text} text tokens, torch {torch.__version__}, {args.threads} threads"
    )
    print("| setup | s / forward | speed-up |\n| --- | ---: | ---: |\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
