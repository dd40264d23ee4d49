"""Token merging inside one FLUX.1-shaped joint attention call: dense SDPA vs kv and qkv at several ratios.

24 heads x 128, 512 text tokens first, a 64 x 64 (1K) or 128 x 128 (2K) image grid, q/k/v laid out as
diffusers hands them to SDPA (``[B, N, H, D]`` permuted). Each row times the whole merged call (matching,
merge, SDPA, unmerge) and, apart, the matching + merge plan and the merge/unmerge gathers, so the overhead
that tomesd users see eat the saving at low ratios is visible. Ratios are against dense SDPA measured in
the same run; "FLOP ratio" is dense attended pairs over merged ones (the ideal speed-up).

Usage:
    python benchmarks/bench_token_merging_dit.py               # 1K, ratios 0.25 0.5 0.75
    python benchmarks/bench_token_merging_dit.py --grid 128    # 2K
    python benchmarks/bench_token_merging_dit.py --smoke       # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from timing import median_seconds

from attnsurgery.ops.token_merge import match_tokens, plan_merge
from attnsurgery.processors.joint_merge import merged_joint_attention

HEADS, HEAD_DIM, TEXT = 24, 128, 512


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=64, help="image grid side (64: 1024 px, 128: 2048 px)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="2 heads x 16, grid 16, 16 text tokens")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    heads, dim, text, side = (2, 16, 16, 16) if args.smoke else (HEADS, HEAD_DIM, TEXT, args.grid)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, text + side * side, heads, dim, generator=g).transpose(1, 2) for _ in range(3))
    image = side * side
    rows = []
    with torch.inference_mode():
        dense = median_seconds(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
        rows.append(f"| dense SDPA | - | {dense:.3f} | - | - | 1.00x | 1.00x |")
        for ratio in args.ratios:
            r = math.floor(image * ratio)

            def plan(r: int = r):
                match = match_tokens(k[:, :, text:].mean(dim=1), side, side, 2, 2)
                return plan_merge(match, r)

            merge_plan = plan()
            kept = merge_plan.num_out
            planning = median_seconds(plan, args.repeats)
            joint = merge_plan.with_passthrough(text, first=True)
            out = joint.merge_heads(q)
            for mode in ("kv", "qkv"):

                def gathers(mode: str = mode, joint=joint, out=out):
                    merged = [joint.merge_heads(x) for x in ((k, v) if mode == "kv" else (q, k, v))]
                    return merged if mode == "kv" else joint.unmerge_heads(out)

                moving = median_seconds(gathers, args.repeats)

                def call(mode: str = mode, r: int = r):
                    return merged_joint_attention(
                        q, k, v, plan(r), num_text=text, text_first=True, mode=mode, scale=dim**-0.5
                    )

                took = median_seconds(call, args.repeats)
                queries = text + image if mode == "kv" else text + kept
                flops = (text + image) ** 2 / (queries * (text + kept))
                rows.append(
                    f"| {mode} | {ratio:.2f} | {took:.3f} | {planning:.3f} | {moving:.3f} | {dense / took:.2f}x "
                    f"| {flops:.2f}x |"
                )
                print(rows[-1], flush=True)
    print(f"\n{heads} heads x {dim}, {text} text + {side} x {side} image tokens, fp32, {args.threads} threads")
    print("| mode | ratio | s / call | of which matching + plan | merge + unmerge | speed-up | FLOP ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
