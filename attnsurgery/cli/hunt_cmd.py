"""``attnsurgery hunt``: search the heads whose perturbation guidance serves an objective; write a head set."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register"]


def register(commands: argparse._SubParsersAction) -> None:
    from ..headhunter.objectives import OBJECTIVES

    parser = commands.add_parser(
        "hunt",
        help="greedy search for attention heads (HeadHunter); writes a head-set JSON",
        description="Score every candidate head by the objective over the prompts' images generated with "
        "perturbation guidance on it, add the best ones, repeat. Unset settings take the family's preset. "
        "Use the result with `attnsurgery generate --pag 3 --pag-heads heads.json`.",
    )
    parser.add_argument(
        "--model", default="reference", help="'reference' (default), 'reference-flux', a hub id or a local path"
    )
    parser.add_argument("--prompts", type=Path, required=True, help="text file, one prompt per line ('#' comments)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; pairs are every prompt with every seed")
    parser.add_argument("--objective", default="clip", help=f"one of {', '.join(OBJECTIVES)}")
    parser.add_argument("--objective-model", default=None, help="hub id or local folder of the objective's model")
    parser.add_argument("--objective-processor", default=None, help="its processor, if stored elsewhere")
    parser.add_argument("--objective-head", default=None, help="aesthetic head weights (.pth or .safetensors)")
    parser.add_argument("--rounds", type=int, default=None, help="greedy rounds R (preset)")
    parser.add_argument("--top-k", type=int, default=None, help="heads added per round k (preset)")
    parser.add_argument("--scale", type=float, default=None, help="perturbation guidance scale (preset)")
    parser.add_argument("--soft", type=float, default=None, help="SoftPAG blend u while searching (preset)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (preset)")
    parser.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (preset)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (preset or model default)")
    parser.add_argument("--candidates", default="all", help="layer selector whose heads compete (default all)")
    parser.add_argument("--batch-candidates", type=int, default=8, help="images per denoiser call (default 8)")
    parser.add_argument("--no-racing", action="store_true", help="score every candidate on every pair (slow)")
    parser.add_argument("--out", type=Path, required=True, help="head-set JSON to write")
    parser.add_argument("--resume", action="store_true", help="continue from OUT.progress.json of an earlier run")
    parser.add_argument("--grid", type=Path, default=None, help="also write a PNG grid of the top heads x prompts")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=run)


def _prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"--prompts file {str(path)!r} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts file {str(path)!r} holds no prompts (one per line)")
    return prompts


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers (0,1,2), got {text!r}") from None
    if not seeds:
        raise ValueError("--seeds needs at least one seed")
    return seeds


def checkpoint_path(out: Path) -> Path:
    """Where the search's progress is saved after every batch."""
    return out.with_name(out.name + ".progress.json")


def run(args: argparse.Namespace) -> int:
    from ..headhunter.api import DEFAULT_RACING, head_grid, hunt, report_table, search_pairs
    from ..headhunter.objectives import make_objective
    from ..pipelines.loading import load_pipeline

    prompts, seeds = _prompts(args.prompts), _seeds(args.seeds)
    progress = checkpoint_path(args.out)
    if progress.exists() and not args.resume:
        raise ValueError(
            f"{str(progress)!r} holds an earlier search's progress; pass --resume to continue it, "
            "or delete it to start over"
        )
    objective = args.objective
    if not objective.startswith("python:"):  # load the model once, before the pipeline
        objective = make_objective(objective, args.objective_model, args.objective_processor, args.objective_head)
    pipe = load_pipeline(args.model)
    result = hunt(
        pipe,
        prompts,
        seeds,
        objective,
        rounds=args.rounds,
        top_k=args.top_k,
        soft=args.soft,
        scale=args.scale,
        steps=args.steps,
        cfg=args.cfg,
        height=args.size,
        width=args.size,
        candidates=args.candidates,
        batch_candidates=args.batch_candidates,
        racing=None if args.no_racing else DEFAULT_RACING,
        resume=progress,
        progress=not args.no_progress,
    )
    if result.process_index != 0:  # under `accelerate launch` the first process writes the results
        return 0
    result.head_set.save(args.out)
    progress.unlink(missing_ok=True)
    print(report_table(result.head_set))
    print(
        f"\n{len(result.head_set.heads)} heads -> {args.out}; {result.denoiser_calls} denoiser calls "
        f"({result.exhaustive_calls} for the exhaustive loop), {result.images} images, {result.seconds:.1f} s"
    )
    if args.grid is not None:
        head_grid(pipe, result.head_set, search_pairs(prompts, seeds)[:4], path=args.grid)
        print(f"grid -> {args.grid}")
    return 0
