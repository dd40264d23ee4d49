"""The high-resolution question on the U-Net reference: duplication at 2x, plain vs RAU-Net by RAD duration,
and the size of the objects the model draws (as a fraction of the image side).

The numbers in docs/techniques/reference-world.md come from this script (24 pairs; about 20 minutes on one
CPU thread):

    python benchmarks/bench_reference_hires.py --pairs 24 --t1 0.4,0.6,0.8,1.0
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import attnsurgery as surg
from attnsurgery.pipelines.loading import load_pipeline
from attnsurgery.reference.eval import EvalReport, evaluate, heldout_pairs, pipeline_sampler
from attnsurgery.reference.model import GUIDANCE_SCALE, NATIVE_SIZE


def row(label: str, size: int, report: EvalReport, seconds: float) -> str:
    """Metrics, extra objects with a 95% interval, and object side / image side percentiles."""
    extra = np.array([s.extra_objects for s in report.scores])
    half = 1.96 * extra.std(ddof=1) / np.sqrt(len(extra)) if len(extra) > 1 else float("nan")
    sides = [max(d.bbox[2], d.bbox[3]) / size for s in report.scores for d in s.detections]
    p10, p50, p90 = np.percentile(sides, [10, 50, 90]) if sides else [float("nan")] * 3
    m = report.metrics
    return (
        f"| {label} | {size} | {m.fidelity:.3f} | {m.duplication_rate:.3f} | {extra.mean():.2f} +- {half:.2f} | "
        f"{len(sides) / len(report.scores):.2f} | {p10:.3f} / {p50:.3f} / {p90:.3f} | {seconds:.0f} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=24, help="held-out one-object pairs (from index 300000)")
    parser.add_argument("--t1", default="0.4,0.6,0.8,1.0", help="RAD durations to try (ratios of the steps)")
    parser.add_argument("--scale", type=int, default=2, help="multiple of the native 64 px")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default="reference", help="'reference' or a folder of reference weights")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain rows (measured in an earlier run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    pairs = heldout_pairs(args.pairs, num_objects=1, start=300_000)
    size = NATIVE_SIZE * args.scale
    setups = [("plain", NATIVE_SIZE, ()), ("plain", size, ()), ("HiDiffusion preset", size, (surg.HiDiffusion(),))] + [
        (f"RAU-Net t1={t}", size, (surg.HiDiffusion(window_attn=False, t1=float(t)),)) for t in args.t1.split(",")
    ]
    if args.no_plain:
        setups = setups[2:]
    print(f"{args.pairs} held-out one-object pairs, {args.steps} steps, guidance {GUIDANCE_SCALE}, one thread")
    print("| setup | px | fidelity | duplication | extra objects | objects/image | object side p10 / p50 / p90 | s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for label, px, plugins in setups:
        start = time.perf_counter()
        with surg.patched(pipe, *plugins):
            report = evaluate(pipeline_sampler(pipe, args.steps, GUIDANCE_SCALE), pairs, px, progress=False)
        print(row(label, px, report, time.perf_counter() - start), flush=True)


if __name__ == "__main__":
    main()
