"""Head-level perturbed-attention guidance with a head set: search a few heads, save them, guide with them.

A head set is a JSON file (heads, per-round scores, settings, model fingerprint) that
``attnsurgery hunt`` or ``surg.hunt`` writes; ``PerturbedAttention(heads=Path(...))`` loads it and refuses
it on another architecture. Here the search runs on the reference model with the analytic evaluator as
its objective, over the heads of the first up-block's attention layers.

    python examples/head_pag_with_a_head_set.py --steps 10 --out out/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import attnsurgery as surg
from attnsurgery.pipelines.loading import load_pipeline
from attnsurgery.reference.evaluator import score
from attnsurgery.reference.model import GUIDANCE_SCALE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", nargs="+", default=["a red circle", "a blue square"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--candidates", default="up_blocks.1.attentions.0", help="layers whose heads compete")
    parser.add_argument("--scale", type=float, default=2.0, help="perturbation guidance scale")
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args(argv)

    pipe = load_pipeline("reference")
    pipe.set_progress_bar_config(disable=True)
    result = surg.hunt(
        pipe,
        args.prompts,
        seeds=args.seeds,
        objective="reference",
        rounds=1,
        top_k=2,
        steps=args.steps,
        cfg=GUIDANCE_SCALE,
        scale=args.scale,
        candidates=args.candidates,
        racing=None,
        progress=False,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = result.head_set.save(args.out / "heads.json")
    print(f"selected heads {list(result.head_set.heads)}, saved to {path}")

    with surg.patched(pipe, surg.PerturbedAttention(scale=args.scale, heads=path)):
        for index, prompt in enumerate(args.prompts):
            image = pipe(
                prompt,
                num_inference_steps=args.steps,
                guidance_scale=GUIDANCE_SCALE,
                generator=torch.Generator().manual_seed(args.seeds[0]),
            ).images[0]
            image.save(args.out / f"pag-heads-{index}.png")
            verdict = score(image, prompt)
            print(f"{prompt!r}: {'correct' if verdict.correct else 'wrong'} (found {dict(verdict.detected)})")


if __name__ == "__main__":
    main()
