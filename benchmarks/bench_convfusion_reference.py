"""ConvFusion on the reference model: distil every attn1 into conv blocks, then compare student and teacher
with the analytic evaluator (fidelity, duplication, clean shapes, seconds per image) on held-out prompts.

The training images are rendered by the reference world's shapes generator (the data the teacher itself
was trained on, seeds below the held-out range), written once as a captioned image folder.
Goal (issue): student fidelity >= 0.9 x the teacher's.

Usage (from the repository root):
    python benchmarks/bench_convfusion_reference.py --out /tmp/cf_ref [--images 2000] [--steps 800]
        [--batch-size 16] [--lr 1e-3] [--cooldown-steps 400] [--pairs 200] [--threads 1] [--weights DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import attnsurgery as surg
from attnsurgery.distill import DistillConfig, distill
from attnsurgery.reference.eval import evaluate, heldout_pairs, pipeline_sampler
from attnsurgery.reference.model import GUIDANCE_SCALE, load_reference_pipeline
from attnsurgery.reference.shapes import HELDOUT_SEED_BASE, make_scene, render


def render_training_folder(folder: Path, count: int, seed: int = 1) -> Path:
    """``count`` captioned 64 px scenes (1-3 objects) with a metadata.jsonl; skipped if already there."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "metadata.jsonl").exists():
        return folder
    rng = np.random.default_rng(seed)
    rows = []
    for i in tqdm(range(count), desc="render"):
        scene = make_scene(int(rng.integers(0, HELDOUT_SEED_BASE)), int(rng.integers(1, 4)))
        name = f"{i:05d}.png"
        Image.fromarray(render(scene, 64)).save(folder / name)
        rows.append(json.dumps({"file_name": name, "text": scene.caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument(
        "--cooldown-steps",
        type=int,
        default=400,
        help="LR cool-down over the last N steps (student: 0.92x the teacher with 400, 0.85x with 0)",
    )
    parser.add_argument("--pairs", type=int, default=200, help="held-out one-object pairs per row")
    parser.add_argument("--cfg", type=float, default=GUIDANCE_SCALE)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", type=Path, default=None, help="reference weights folder (default: shipped)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_reference_pipeline(weights_dir=args.weights)
    data = render_training_folder(args.out / "images", args.images)
    config = DistillConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        cooldown_steps=args.cooldown_steps,
        checkpoint_every=0,
    )
    result = distill(pipe, data, args.out / "blocks", config)
    losses = [row["loss"] for row in result.history]
    print(f"distillation: {len(losses)} steps, loss {np.mean(losses[:20]):.4f} -> {np.mean(losses[-20:]):.4f}")
    pipe.set_progress_bar_config(disable=True)
    sampler = pipeline_sampler(pipe, num_inference_steps=20, guidance_scale=args.cfg)
    print(f"\nReference model, {type(pipe.scheduler).__name__} 20 steps, CFG {args.cfg}, held-out prompts:\n")
    print("| model | prompts | pairs | fidelity | duplication | clean shapes | s/image | fidelity vs teacher |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for objects in (1, 2):
        pairs = heldout_pairs(args.pairs if objects == 1 else args.pairs // 2, num_objects=objects, start=700_000)
        teacher = None
        for label, plugins in (("teacher (attention)", []), ("student (ConvFusion)", [result.plugin])):
            with surg.patched(pipe, *plugins):
                report = evaluate(sampler, pairs, progress=False)
            m = report.metrics
            teacher = teacher if teacher is not None else m.fidelity
            ratio = m.fidelity / teacher if teacher else float("nan")
            print(
                f"| {label} | {objects} object(s) | {m.samples} | {m.fidelity:.3f} | {m.duplication_rate:.3f} | "
                f"{m.clean_shape_rate:.3f} | {report.seconds_per_image:.3f} | {ratio:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
