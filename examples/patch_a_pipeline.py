"""Patch a pipeline in a few lines: HiDiffusion above the native size, timed against the plain pipeline.

The shipped reference model draws 64 px images; at 2x (128 px) a plain U-Net repeats objects, and
HiDiffusion's RAU-Net keeps one layout. ``remove()`` then gives the plain pipeline back, bit for bit.

    python examples/patch_a_pipeline.py --size 128 --steps 20 --out out/
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import attnsurgery as surg
from attnsurgery.pipelines.loading import load_pipeline
from attnsurgery.reference.model import GUIDANCE_SCALE


def generate(pipe, prompt: str, size: int, steps: int, seed: int):
    start = time.perf_counter()
    image = pipe(
        prompt,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE_SCALE,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]
    return image, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", default="a red circle")
    parser.add_argument("--size", type=int, default=128, help="image side in px (native 64)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args(argv)

    pipe = load_pipeline("reference")
    pipe.set_progress_bar_config(disable=True)
    plain, plain_seconds = generate(pipe, args.prompt, args.size, args.steps, args.seed)

    handle = surg.apply(pipe, surg.HiDiffusion())  # the whole surgery
    patched, patched_seconds = generate(pipe, args.prompt, args.size, args.steps, args.seed)
    handle.remove()  # the plain pipeline again

    again, _ = generate(pipe, args.prompt, args.size, args.steps, args.seed)
    assert again.tobytes() == plain.tobytes(), "remove() must restore the plain pipeline exactly"
    args.out.mkdir(parents=True, exist_ok=True)
    plain.save(args.out / "plain.png")
    patched.save(args.out / "hidiffusion.png")
    print(
        f"{args.size} px, {args.steps} steps: plain {plain_seconds:.2f} s, HiDiffusion {patched_seconds:.2f} s "
        f"({plain_seconds / patched_seconds:.2f}x); images in {args.out}/"
    )


if __name__ == "__main__":
    main()
