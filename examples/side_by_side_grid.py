"""A side-by-side grid: the plain pipeline and each plugin, at 1x and 2x, in one PNG.

Each cell is labelled with the configuration, the seconds it took and the analytic evaluator's verdict
(does the image show exactly the objects the prompt asks for?), so the picture carries its own numbers.

    python examples/side_by_side_grid.py --prompt "a red circle" --steps 20 --out out/grid.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import attnsurgery as surg
from attnsurgery.pipelines.loading import load_pipeline
from attnsurgery.reference.evaluator import score
from attnsurgery.reference.model import GUIDANCE_SCALE, NATIVE_SIZE

CONFIGS: dict[str, tuple[surg.Plugin, ...]] = {
    "plain": (),
    "HiDiffusion": (surg.HiDiffusion(),),
    "ToMe 0.5": (surg.TokenMerging(ratio=0.5),),
    "agents": (surg.AgentAttention(),),
    "PAG mid": (surg.PerturbedAttention(scale=2.0, layers="mid"),),
}
CELL = 192  # every image is shown at this side, so 1x and 2x line up
LABEL_HEIGHT = 40


def cell(pipe, plugins, prompt: str, size: int, steps: int, seed: int) -> Image.Image:
    """One labelled cell: the image scaled to CELL, then name, seconds and verdict beneath."""
    with surg.patched(pipe, *plugins):
        start = time.perf_counter()
        image = pipe(
            prompt,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE_SCALE,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        seconds = time.perf_counter() - start
    verdict = "correct" if score(image, prompt).correct else "wrong"
    canvas = Image.new("RGB", (CELL, CELL + LABEL_HEIGHT), "white")
    canvas.paste(image.resize((CELL, CELL), Image.NEAREST), (0, 0))
    text = f"{size} px, {seconds:.1f} s\n{verdict}"
    ImageDraw.Draw(canvas).multiline_text((4, CELL + 2), text, fill="black")
    return canvas


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", default="a red circle")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2], help="multiples of the native 64 px")
    parser.add_argument("--out", type=Path, default=Path("out/grid.png"))
    args = parser.parse_args(argv)

    pipe = load_pipeline("reference")
    pipe.set_progress_bar_config(disable=True)
    header = 20
    grid = Image.new("RGB", (CELL * len(CONFIGS), header + (CELL + LABEL_HEIGHT) * len(args.scales)), "white")
    draw = ImageDraw.Draw(grid)
    for column, (name, plugins) in enumerate(CONFIGS.items()):
        draw.text((CELL * column + 4, 4), name, fill="black")
        for row, scale in enumerate(args.scales):
            image = cell(pipe, plugins, args.prompt, NATIVE_SIZE * scale, args.steps, args.seed)
            grid.paste(image, (CELL * column, header + (CELL + LABEL_HEIGHT) * row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"{args.prompt!r}: grid of {len(CONFIGS)} configurations x {len(args.scales)} sizes in {args.out}")


if __name__ == "__main__":
    main()
