"""Benchmark HiDiffusion: the MSW-MSA layer and whole U-Net calls against global attention and the package.

1. One attention layer at SD1.5's top-level shape (320 channels, 8 heads of 40) for 1024^2 and 2048^2
   images (latent 128 / 256, 16k / 65k tokens): global SDPA vs our MSW-MSA. The package's windowing
   only exists inside its forked transformer block, so ours and theirs are also timed as whole
   BasicTransformerBlocks, with the same shift, and their outputs compared.
2. One denoiser call of the real-size SD1.5 / SDXL U-Net configs (random weights): plain vs ours vs
   the package, with RAU-Net inactive (MSW-MSA only) and active (RAU-Net + MSW-MSA).

Every ratio is against a baseline measured in the same run. Batch 1, float32, on whatever device
`--device` names (CPU by default; say which when quoting numbers).

Usage:
    python benchmarks/bench_hidiffusion.py --sizes 1024 2048 --unet-sizes 1024 --models sd15 sdxl
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnsurgery as surg
from attnsurgery.ops.windows import WindowGrid, shift_for_index
from attnsurgery.processors.window_attention import WindowAttentionProcessor
from tests.support.hidiffusion_peer import PACKAGE_NAMES, ForcedShifts, import_package

SHIFT = 1  # the same shift index for ours and the package, so outputs are comparable
SD15 = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SDXL = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CONFIGS = {"sd15": SD15, "sdxl": SDXL}
Row = tuple[str, str, float, str]  # case, variant, seconds, ratio text


def timed(fn: Callable[[], torch.Tensor], repeats: int, warmup: int) -> tuple[float, torch.Tensor]:
    """Best wall time of `repeats` calls after `warmup` calls, and the last output."""
    for _ in range(warmup):
        fn()
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


@contextlib.contextmanager
def package_forced_shift() -> Iterator[object]:
    """The package module with its shift draws pinned to SHIFT."""
    package, module = import_package()
    module.torch = ForcedShifts([SHIFT] * 100_000)
    try:
        yield package, module
    finally:
        module.torch = torch


def fixed_plan(latent: int) -> Callable[[int], WindowGrid]:
    window = WindowGrid(latent, latent).window
    grid = WindowGrid(latent, latent, shift=shift_for_index(window, SHIFT))
    return lambda num_tokens: grid


def interleaved(
    variants: dict[str, Callable[[], torch.Tensor]], rounds: int, warmup: int
) -> dict[str, tuple[float, torch.Tensor]]:
    """Best time per variant over round-robin passes, so load changes on a shared machine hit all alike."""
    results = {name: timed(fn, 0, warmup) for name, fn in variants.items()}
    for _ in range(rounds):
        for name, fn in variants.items():
            seconds, out = timed(fn, 1, 0)
            results[name] = (min(seconds, results[name][0]), out)
    return results


def bench_layer_size(size: int, rounds: int, device: str) -> list[Row]:
    torch.manual_seed(0)
    plain = BasicTransformerBlock(320, 8, 40, cross_attention_dim=768).to(device).eval()
    text = torch.randn(1, 77, 768, device=device)
    latent = size // 8
    x = torch.randn(1, latent * latent, 320, device=device)
    ours, theirs = copy.deepcopy(plain), copy.deepcopy(plain)
    ours.attn1.set_processor(WindowAttentionProcessor(AttnProcessor2_0(), fixed_plan(latent)))
    with package_forced_shift() as (_, module):
        theirs.__class__ = module.make_diffusers_transformer_block(type(plain))
        theirs.info = {"size": (latent, latent)}
        results = interleaved(
            {
                "global": lambda: plain.attn1(x),
                "ours": lambda: ours.attn1(x),
                "ours block": lambda: ours(x, encoder_hidden_states=text),
                "package block": lambda: theirs(x, encoder_hidden_states=text),
            },
            rounds,
            warmup=1 if latent <= 128 else 0,
        )
    (t_global, _), (t_ours, _) = results["global"], results["ours"]
    (t_block_ours, out_ours), (t_block_pkg, out_pkg) = results["ours block"], results["package block"]
    diff = f"max|ours-pkg| {float((out_ours - out_pkg).abs().max()):.1e}"
    return [
        (f"attn1 {size}^2 ({latent * latent} tok)", "global SDPA", t_global, ""),
        ("", "ours MSW-MSA", t_ours, f"{t_global / t_ours:.2f}x vs global"),
        (f"block {size}^2", "ours MSW-MSA", t_block_ours, ""),
        ("", "package MSW-MSA", t_block_pkg, f"ours {t_block_pkg / t_block_ours:.2f}x faster; {diff}"),
    ]


def unet_inputs(model: str, latent: int, device: str) -> tuple[torch.Tensor, dict]:
    """A latent and the conditioning kwargs (the package's size hook needs the latent positional)."""
    config = CONFIGS[model]
    sample = torch.randn(1, 4, latent, latent, device=device)
    kwargs = dict(encoder_hidden_states=torch.randn(1, 77, config["cross_attention_dim"], device=device))
    if model == "sdxl":
        time_ids = torch.tensor([[latent * 8.0] * 2 + [0.0] * 2 + [latent * 8.0] * 2], device=device)
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280, device=device), "time_ids": time_ids}
    return sample, kwargs


def bench_unet_size(unet: UNet2DConditionModel, model: str, size: int, device: str) -> list[Row]:
    sample, inputs = unet_inputs(model, size // 8, device)

    def call(timestep: float) -> torch.Tensor:
        return unet(sample, timestep, **inputs).sample

    # progress = 1 - t / 1000 on a bare U-Net: t 999 is the first step (RAU-Net on), t 1 the last (off).
    # force=True: act at every size, as the package does, so the two are comparable.
    t_plain, _ = timed(lambda: call(1.0), 1, 1 if size <= 512 else 0)
    rows = [(f"{model} U-Net {size}^2", "plain", t_plain, "")]
    for phase, timestep in (("RAU-Net off", 1.0), ("RAU-Net on", 999.0)):
        with surg.patched(unet, surg.HiDiffusion(shift=SHIFT, force=True)):
            t_ours, out_ours = timed(lambda t=timestep: call(t), 1, 0)
        with package_forced_shift() as (package, _):
            unet.name_or_path = PACKAGE_NAMES[model]  # what the package reads off a pipeline
            unet._num_timesteps = 50
            package.apply_hidiffusion(unet, apply_raunet=phase == "RAU-Net on")
            try:
                t_pkg, out_pkg = timed(lambda t=timestep: call(t), 1, 0)
            finally:
                package.remove_hidiffusion(unet)
                unet.num_upsamplers -= 12
                del unet.name_or_path, unet._num_timesteps
        diff = float((out_ours - out_pkg).abs().max())
        rows.append(("", f"ours ({phase})", t_ours, f"{t_plain / t_ours:.2f}x vs plain"))
        rows.append(
            (
                "",
                f"package ({phase})",
                t_pkg,
                f"{t_plain / t_pkg:.2f}x vs plain; ours {t_pkg / t_ours:.2f}x; max|diff| {diff:.1e}",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1024, 2048], help="image sides for the layer")
    parser.add_argument("--unet-sizes", type=int, nargs="*", default=[1024], help="image sides for U-Net calls")
    parser.add_argument("--models", nargs="*", default=["sd15", "sdxl"], choices=sorted(CONFIGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds for the layer at 1024^2")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[Row] = []
    with torch.inference_mode():
        for size in tqdm(args.sizes, desc="attention layer"):
            rows += bench_layer_size(size, args.rounds if size <= 1024 else 1 + args.rounds // 2, args.device)
        for model in tqdm(args.models, desc="U-Nets"):
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**CONFIGS[model]).to(args.device).eval()
            for size in args.unet_sizes:
                rows += bench_unet_size(unet, model, size, args.device)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"\nHiDiffusion benchmark ({device}, batch 1, float32, shift index {SHIFT})")
    print(f"{'case':34s} {'variant':26s} {'seconds':>9s}  ratio")
    for case, variant, seconds, ratio in rows:
        print(f"{case:34s} {variant:26s} {seconds:9.3f}  {ratio}")


if __name__ == "__main__":
    main()
