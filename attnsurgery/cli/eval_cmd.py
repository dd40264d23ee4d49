"""``attnsurgery eval``: the reference evaluator over held-out prompts, plain versus with plugins.

Beside fidelity and duplication, each plugin row says how close its images stay to the plain images of
the same pairs (PSNR and SSIM; ``reference.closeness``)."""

from __future__ import annotations

import argparse

from .plugin_flags import add_plugin_flags, plugins_from_args

__all__ = ["register"]


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval",
        help="fidelity, duplication and clean-shape rates on held-out prompts, plain vs plugins",
        description="Score a model with the reference world's analytic evaluator at multiples of its native "
        "size, without and with the given plugins; plugin rows add PSNR and SSIM to the plain images.",
    )
    parser.add_argument("--model", default="reference", help="'reference' (default), 'reference-flux' or a model path")
    parser.add_argument("--pairs", type=int, default=50, help="held-out (prompt, seed) pairs per row (default 50)")
    parser.add_argument(
        "--objects", default="mixed", choices=("1", "2", "3", "mixed"), help="objects per prompt (default: mixed)"
    )
    parser.add_argument("--sizes", default="1,2,4", help="multiples of the native size (default 1,2,4)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--cfg",
        type=float,
        default=None,
        help="guidance scale (default: the reference model's own, 7.5 for other models)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-progress", action="store_true")
    add_plugin_flags(parser)
    parser.set_defaults(run=run)


def _sizes(text: str, native: int) -> list[int]:
    try:
        multiples = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--sizes takes comma-separated multiples of the native size (1,2,4), got {text!r}") from None
    if not multiples or any(m <= 0 for m in multiples):
        raise ValueError(f"--sizes needs positive multiples, got {text!r}")
    return [int(round(native * m)) for m in multiples]


def run(args: argparse.Namespace) -> int:
    from ..families import detect_family
    from ..pipelines.comparison import compare_setups
    from ..pipelines.loading import default_guidance_scale, load_pipeline
    from ..reference.eval import heldout_pairs, pipeline_sampler
    from ..surgery import resolve_target

    if args.pairs < 1 or args.steps < 1 or args.batch_size < 1:
        raise ValueError("--pairs, --steps and --batch-size must be positive")
    plugins = plugins_from_args(args)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    _, denoiser = resolve_target(pipe)
    sizes = _sizes(args.sizes, detect_family(denoiser, getattr(pipe, "vae_scale_factor", None)).native_resolution)
    objects = None if args.objects == "mixed" else int(args.objects)
    pairs = heldout_pairs(args.pairs, objects)
    guidance = default_guidance_scale(args.model) if args.cfg is None else args.cfg
    sampler = pipeline_sampler(pipe, args.steps, guidance)
    setups = [("plain", [])] + ([(" + ".join(type(p).__name__ for p in plugins), plugins)] if plugins else [])
    header = (
        f"{'setup':<32} {'size':>5} {'fidelity':>9} {'duplication':>12} {'clean shapes':>13} "
        f"{'PSNR dB':>8} {'SSIM':>6} {'s/image':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in compare_setups(pipe, sampler, setups, pairs, sizes, args.batch_size, progress=not args.no_progress):
        m = row.report.metrics
        closeness = f"{'-':>8} {'-':>6}" if row.psnr is None else f"{row.psnr:>8.2f} {row.ssim:>6.3f}"
        lines.append(
            f"{row.setup:<32} {row.size:>5} {m.fidelity:>9.3f} {m.duplication_rate:>12.3f} "
            f"{m.clean_shape_rate:>13.3f} {closeness} {row.report.seconds_per_image:>8.3f}  "
            f"({row.time_ratio:.2f}x plain)"
        )
    print("\n".join(lines))
    return 0
