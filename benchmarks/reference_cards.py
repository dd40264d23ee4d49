"""The technique cards: every technique on both reference models, at native size and 2x, in one markdown file.

Each table compares a technique with the plain pipeline on the same held-out pairs and seeds: fidelity,
duplication, extra objects, clean shapes, PSNR/SSIM to the plain image, seconds per image. The file in
docs/ is written by this one command (about an hour on one CPU thread at the defaults):

    python benchmarks/reference_cards.py --out docs/techniques/reference-cards.md

``--pairs`` and ``--sizes`` make a quicker, noisier card; the header of the file records what was run.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import attnsurgery as surg
from attnsurgery.pipelines.comparison import Setup, compare_setups, markdown_table
from attnsurgery.pipelines.loading import default_guidance_scale, load_pipeline
from attnsurgery.reference.eval import heldout_pairs, pipeline_sampler
from attnsurgery.surgery import resolve_target

#: Every technique that exists for each reference model's topology: card name -> (model, setups).
CARDS: dict[str, tuple[str, list[Setup]]] = {
    "reference": (
        "reference",
        [
            ("HiDiffusion", [surg.HiDiffusion()]),
            ("ToMe 0.5", [surg.TokenMerging(ratio=0.5)]),
            ("Agent attention", [surg.AgentAttention()]),
            ("PAG, family layers", [surg.PerturbedAttention(scale=2.0)]),
            ("PAG, heads mid:0,1", [surg.PerturbedAttention(scale=2.0, heads=["mid_block:0,1"])]),
        ],
    ),
    "reference-flux": (
        "reference-flux",
        [
            ("NeighborhoodAttention", [surg.NeighborhoodAttention()]),
            ("NeighborhoodAttention, stride 4", [surg.NeighborhoodAttention(stride=4)]),
            ("NeighborhoodAttention + proportional", [surg.NeighborhoodAttention(proportional=True)]),
            ("ToMe 0.5 (qkv)", [surg.TokenMerging(ratio=0.5)]),
            ("ToMe 0.5 (kv)", [surg.TokenMerging(ratio=0.5, mode="kv")]),
            ("Agent attention", [surg.AgentAttention()]),
            ("PAG, family layers", [surg.PerturbedAttention(scale=2.0)]),
            ("PAG, heads (1, 0..1)", [surg.PerturbedAttention(scale=2.0, heads=[(1, 0), (1, 1)])]),
        ],
    ),
    # not in the default run: token merging's ratios on the DiT, a card of its own (reference-cards-merge-ratios.md)
    "reference-flux merge ratios": (
        "reference-flux",
        [
            (f"ToMe {ratio} ({mode})", [surg.TokenMerging(ratio=ratio, mode=mode)])
            for ratio in (0.25, 0.5, 0.75)
            for mode in ("qkv", "kv")
        ],
    ),
}
DEFAULT_CARDS = ("reference", "reference-flux")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write")
    parser.add_argument("--pairs", type=int, default=24, help="held-out one-object pairs per row")
    parser.add_argument("--sizes", default="1,2", help="multiples of the native size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cards", default=",".join(DEFAULT_CARDS), help=f"comma-separated cards ({', '.join(CARDS)})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pairs = heldout_pairs(args.pairs, num_objects=1, start=400_000)
    multiples = [int(m) for m in args.sizes.split(",")]
    sections = [
        "# Technique cards on the reference models",
        "",
        f"Written by `python benchmarks/reference_cards.py --out {args.out.as_posix()} --pairs {args.pairs} "
        f"--sizes {args.sizes} --cards '{args.cards}'`: {args.pairs} held-out one-object pairs per row (seeds "
        "from index 400000), "
        f"{args.steps} steps, each model's own guidance scale, one CPU thread ({platform.machine()}). PSNR and "
        "SSIM compare each image with the plain image of the same pair and size; time is per image.",
    ]
    for card in args.cards.split(","):
        if card not in CARDS:
            parser.error(f"unknown card {card!r}; choose from {', '.join(CARDS)}")
        model, setups = CARDS[card]
        pipe = load_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        _, denoiser = resolve_target(pipe)
        native = surg.detect_family(denoiser, pipe.vae_scale_factor).native_resolution
        sampler = pipeline_sampler(pipe, args.steps, default_guidance_scale(model))
        start = time.perf_counter()
        rows = compare_setups(pipe, sampler, setups, pairs, [native * m for m in multiples])
        minutes = (time.perf_counter() - start) / 60
        sections += ["", f"## `{card}` ({minutes:.0f} min)", "", markdown_table(rows)]
        print("\n".join(sections[-3:]), flush=True)
    args.out.write_text("\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
