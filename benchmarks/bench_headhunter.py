"""Cost of a head search: the paper's exhaustive loop versus ours (batched candidates + racing).

Per model, in one run:
  exhaustive   one candidate per pipeline pass, every candidate on every (prompt, seed) pair
  batched      the same items, `--batch` per pipeline call (every row its own head set)
  ours         batched + racing (successive halving over the pairs)
The table gives denoiser calls, images generated and seconds, with ratios against the exhaustive loop,
and how many of the exhaustive loop's selected heads each variant also selects.

Models: the tiny test SD1.5 U-Net and SD3 transformer (random weights; the objective is image contrast,
an arbitrary but deterministic target), and the reference model with its analytic evaluator when its
trained weights are installed. On the reference model, `--heldout N` also scores the found heads against
layer-level PAG (the mid block, the family default) and CFG alone on N held-out one-object prompts.

Usage (from the repository root):
    python benchmarks/bench_headhunter.py [--models tiny-sd15,tiny-sd3,reference] [--prompts 4] [--seeds 2]
        [--steps 4] [--top-k 4] [--batch 16] [--heldout 100] [--threads 1] [--weights DIR]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

import attnsurgery as surg
from attnsurgery.headhunter import Racing, ReferenceScore
from attnsurgery.reference.eval import evaluate, heldout_pairs, pipeline_sampler
from attnsurgery.testing import tiny

TINY_PROMPTS = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow circle",
    "a purple square",
    "an orange triangle",
    "a red square",
    "a blue circle",
]


def contrast(images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
    """Pixel standard deviation: deterministic, and sensitive to every head of a random-weight model."""
    return [float(np.asarray(image, np.float64).std()) for image in images]


def _model(name: str, weights: str | None = None) -> tuple[Any, Callable, list[str], dict[str, Any]]:
    if name == "tiny-sd15":
        return tiny.tiny_sd15(), contrast, TINY_PROMPTS, {"height": 64, "width": 64, "cfg": 4.0}
    if name == "tiny-sd3":
        return tiny.tiny_sd3(), contrast, TINY_PROMPTS, {"height": 64, "width": 64, "cfg": 1.0}
    if name == "reference":
        from attnsurgery.reference.model import load_reference_pipeline

        prompts = [p for p, _ in heldout_pairs(8, num_objects=1, start=900_000)]
        return load_reference_pipeline(weights_dir=weights), ReferenceScore(), prompts, {"cfg": 4.0}
    raise SystemExit(f"unknown model {name!r}; use tiny-sd15, tiny-sd3 or reference")


def _search(
    pipe: Any,
    objective: Callable,
    prompts: list[str],
    args: argparse.Namespace,
    batch: int,
    racing: Racing | None,
    settings: dict[str, Any],
) -> tuple[surg.headhunter.HuntResult, float]:
    start = time.perf_counter()
    result = surg.hunt(
        pipe,
        prompts[: args.prompts],
        seeds=list(range(args.seeds)),
        objective=objective,
        top_k=args.top_k,
        rounds=1,
        steps=args.steps,
        batch_candidates=batch,
        racing=racing,
        progress=False,
        **settings,
    )
    return result, time.perf_counter() - start


def heldout_comparison(pipe: Any, heads: Sequence[str], pairs: int, steps: int, cfg: float) -> list[str]:
    """Fidelity and clean shapes on held-out one-object prompts: CFG, + layer PAG, + the found heads."""
    held = heldout_pairs(pairs, num_objects=1, start=800_000)
    sampler = pipeline_sampler(pipe, num_inference_steps=steps, guidance_scale=cfg)
    rows = []
    for label, plugins in (
        ("CFG only", []),
        ("+ PAG, mid block (layer level)", [surg.PerturbedAttention(3.0)]),
        (f"+ PAG, {len(heads)} found heads", [surg.PerturbedAttention(3.0, heads=list(heads))]),
    ):
        with surg.patched(pipe, *plugins):
            report = evaluate(sampler, held, progress=False)
        m = report.metrics
        rows.append(
            f"| {label} | {m.samples} | {m.fidelity:.3f} | {m.clean_shape_rate:.3f} | "
            f"{m.duplication_rate:.3f} | {report.seconds_per_image:.2f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny-sd15,tiny-sd3")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heldout", type=int, default=0, help="held-out pairs for the reference comparison")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", default=None, help="reference weights folder (default: the shipped ones)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        "| model | variant | candidates | pairs | denoiser calls | images | seconds | calls vs exhaustive | "
        "time vs exhaustive | same heads as exhaustive |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    found: dict[str, tuple[Any, tuple[str, ...]]] = {}
    for name in args.models.split(","):
        pipe, objective, prompts, settings = _model(name, args.weights)
        pipe.set_progress_bar_config(disable=True)
        baseline = None
        for variant, batch, racing in (
            ("exhaustive", 1, None),
            ("batched", args.batch, None),
            ("ours: batched + racing", args.batch, Racing()),
        ):
            result, seconds = _search(pipe, objective, prompts, args, batch, racing, settings)
            heads = result.head_set.heads
            baseline = baseline or (result.denoiser_calls, seconds, set(heads))
            same = len(set(heads) & baseline[2])
            print(
                f"| {name} | {variant} | {len(result.head_set.settings['candidates'])} | "
                f"{len(result.head_set.settings['pairs'])} | {result.denoiser_calls} | {result.images} | "
                f"{seconds:.1f} | {baseline[0] / result.denoiser_calls:.1f}x fewer | "
                f"{baseline[1] / seconds:.2f}x faster | {same}/{len(heads)} |",
                flush=True,
            )
        found[name] = (pipe, heads)
    if args.heldout and "reference" in found:
        pipe, heads = found["reference"]
        print("\nHeld-out one-object prompts, reference model, 20 steps, CFG 4.0:\n")
        print("| guidance | pairs | fidelity | clean shapes | duplication | s/image |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        print("\n".join(heldout_comparison(pipe, heads, args.heldout, 20, 4.0)))


if __name__ == "__main__":
    main()
