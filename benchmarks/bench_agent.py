"""Speed of ToMe and agent attention against SDPA, measured together in one run.

Part 1: one self-attention layer at SD1.5 top-level shapes (320 channels, 8 heads of 40) for 512^2,
1024^2 and 2048^2 images (64^2, 128^2, 256^2 tokens), timing the whole sub-layer a block would run:
matching, merging, attention, unmerging. Variants: the layer's own SDPA processor; tomesd's merge
function around it (ratio 0.5, 2x2 cells, fixed dst); our TokenMergeProcessor at the same settings; our
AgentProcessor in the published schedule's first phase (4x4 cells, ratio 0.4, agent ratio 0.95) with ToMe
agents and with pooled agents.

Part 2: one call of a full-size SD1.5 U-Net (random weights) at 1024^2 with each variant on the top
level (the tomesd row uses tomesd.apply_patch with its defaults but use_rand=False).

Usage:
    python benchmarks/bench_agent.py                       # everything (long on a CPU)
    python benchmarks/bench_agent.py --sizes 512 1024 --skip-unet
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from timing import median_seconds
from tqdm import tqdm

import attnsurgery as surg
from attnsurgery.context import StepContext
from attnsurgery.families import detect_family
from attnsurgery.processors.agent import AgentProcessor
from attnsurgery.processors.token_merge import BlockInput, TokenMergeProcessor

CHANNELS, HEADS = 320, 8
TOME_RATIO = 0.5


def layer_variants(size: int, batch: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Callables running one top-level self-attention sub-layer of an SD1.5 block at ``size`` pixels."""
    import tomesd.merge

    side = size // 8
    tokens = side * side
    attn = Attention(query_dim=CHANNELS, heads=HEADS, dim_head=CHANNELS // HEADS).eval()
    block_x = torch.randn(batch, tokens, CHANNELS)
    normed = torch.nn.functional.layer_norm(block_x, (CHANNELS,))
    context = StepContext(detect_family(UNet2DConditionModel(), 8), latent_hw=(side, side), step_index=0, num_steps=50)
    block_input = BlockInput()
    machinery = {"context": context, "block_input": block_input, "generator": None}
    sdpa = AttnProcessor2_0()
    ours_tome = TokenMergeProcessor(sdpa, ratio=TOME_RATIO, sx=2, sy=2, **machinery)
    agent_settings = {
        "schedule": surg.AgentAttention().schedule,
        "k_scale2": 0.3,
        "k_shortcut": 0.075,
        "compute_dtype": None,
    }
    agent_tome = AgentProcessor(sdpa, source="tome", **agent_settings, **machinery)
    agent_pool = AgentProcessor(sdpa, source="pool", **agent_settings, **machinery)

    def with_block_input(processor) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            block_input.hook(None, (block_x,), {})
            return processor(attn, normed)

        return run

    def tomesd_layer() -> torch.Tensor:
        r = int(tokens * TOME_RATIO)
        merge, unmerge = tomesd.merge.bipartite_soft_matching_random2d(block_x, side, side, 2, 2, r, True)
        return unmerge(sdpa(attn, merge(normed)))

    return {
        "SDPA": lambda: sdpa(attn, normed),
        "tomesd ToMe 0.5": tomesd_layer,
        "ours ToMe 0.5": with_block_input(ours_tome),
        "agent (tome agents)": with_block_input(agent_tome),
        "agent (pool agents)": with_block_input(agent_pool),
    }


def unet_variants(unet: UNet2DConditionModel) -> dict[str, tuple[Callable[[], object], Callable[[], None]]]:
    """(apply, remove) pairs that put each variant on the U-Net's top level."""
    import tomesd

    handles: list[surg.Surgery] = []

    def ours(*plugins: surg.Plugin) -> tuple[Callable[[], object], Callable[[], None]]:
        return (lambda: handles.append(surg.apply(unet, *plugins)), lambda: handles.pop().remove())

    return {
        "SDPA": (lambda: None, lambda: None),
        "tomesd ToMe 0.5": (
            lambda: tomesd.apply_patch(unet, ratio=TOME_RATIO, use_rand=False),
            lambda: tomesd.remove_patch(unet),
        ),
        "ours ToMe 0.5": ours(surg.TokenMerging(ratio=TOME_RATIO, use_rand=False)),
        "agent (tome agents)": ours(surg.AgentAttention(use_rand=False)),
        "agent (pool agents)": ours(surg.AgentAttention(agent_source="pool", use_rand=False)),
    }


def table(rows: list[tuple[str, str, float]], baseline: str = "SDPA") -> str:
    """Markdown table with speed-ups against SDPA and, for our ToMe, against tomesd, per case."""
    by_case: dict[str, dict[str, float]] = {}
    for case, variant, seconds in rows:
        by_case.setdefault(case, {})[variant] = seconds
    lines = ["| case | variant | time (s) | speed-up vs SDPA | vs tomesd |", "| --- | --- | --- | --- | --- |"]
    for case, times in by_case.items():
        for variant, seconds in times.items():
            vs_tomesd = ""
            if variant == "ours ToMe 0.5" and "tomesd ToMe 0.5" in times:  # equal settings only
                vs_tomesd = f"{times['tomesd ToMe 0.5'] / seconds:.2f}x"
            lines.append(f"| {case} | {variant} | {seconds:.3f} | {times[baseline] / seconds:.2f}x | {vs_tomesd} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="image sides in px")
    parser.add_argument("--batch", type=int, default=1, help="layer batch (CFG would be 2)")
    parser.add_argument("--threads", type=int, default=2, help="1 gives steadier numbers on a busy machine")
    parser.add_argument("--skip-unet", action="store_true", help="only the single-layer part")
    parser.add_argument("--unet-size", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows: list[tuple[str, str, float]] = []
    with torch.inference_mode():
        for size in args.sizes:
            repeats, warmup = (3, 1) if size <= 512 else (2, 1) if size <= 1024 else (1, 0)
            variants = layer_variants(size, args.batch)
            for name, fn in tqdm(variants.items(), desc=f"layer {size}px", leave=False):
                rows.append((f"layer {size}^2 ({(size // 8) ** 2} tok)", name, median_seconds(fn, repeats, warmup)))
                tqdm.write(f"{rows[-1][0]} | {name} | {rows[-1][2]:.3f} s")
        if not args.skip_unet:
            unet = UNet2DConditionModel(cross_attention_dim=768).eval()  # SD1.5's architecture
            side = args.unet_size // 8
            sample = torch.randn(1, 4, side, side)
            text = torch.randn(1, 77, 768)
            timestep = torch.tensor([999])
            for name, (attach, detach) in tqdm(unet_variants(unet).items(), desc="unet", leave=False):
                attach()
                try:
                    seconds = median_seconds(lambda: unet(sample, timestep, encoder_hidden_states=text), 1, 0)
                finally:
                    detach()
                rows.append((f"SD1.5 U-Net {args.unet_size}^2", name, seconds))
                tqdm.write(f"{rows[-1][0]} | {name} | {seconds:.3f} s")
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, float32, CPU")
    print(table(rows))


if __name__ == "__main__":
    main()
