"""``attnsurgery bench``: how much faster each plugin is on this device, model and resolution.

Each plugin flag group (and each ``--plugin JSON``) becomes one row, measured against the plain pipeline in
the same run by ``attnsurgery.pipelines.bench.benchmark``, the function the GPU suite uses too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from .plugin_flags import add_plugin_flags, plugins_from_args

__all__ = ["register", "bench_pipeline", "rows_from_args", "TINY_MODELS"]

#: The tiny test pipelines of ``attnsurgery.testing`` by ``--model`` name (seconds on a CPU).
TINY_MODELS = ("tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-sd35", "tiny-flux")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "bench",
        help="time plain vs plugin configurations on your device, model and resolution",
        description="Time the denoiser step, the whole image and peak memory, plain vs each plugin flag group "
        "(one row each), with ratios against plain measured in the same run.",
    )
    parser.add_argument(
        "--model",
        default="reference",
        help="a named shape with random weights (sd15, sd21, sdxl, sd3-medium, sd35-medium, "
        "sd35-large, flux-dev, flux-schnell), a tiny test model (tiny-sd15, ...), "
        "'reference', a diffusers folder or a hub id (default: reference)",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build --model from its configs with random weights (named shapes always are)",
    )
    parser.add_argument("--height", type=int, required=True, help="image height in pixels")
    parser.add_argument("--width", type=int, required=True, help="image width in pixels")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed images per row (default 3; median, range)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed images per row first (default 1)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("bf16", "fp16", "fp32"),
        help="default: bf16 on CUDA, fp32 on the CPU (fp16 is refused on the CPU)",
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="also time every row with the denoiser under torch.compile (default backend inductor; "
        "'eager' only traces); compile time is reported apart",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the full results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_plugin_flags(parser)
    parser.set_defaults(run=run)


def _label(plugin: Any, seen: Counter) -> str:
    name = type(plugin).__name__
    if name == "PerturbedAttention":
        name += " (heads)" if plugin.heads is not None else " (layers)"
    seen[name] += 1
    return name if seen[name] == 1 else f"{name} #{seen[name]}"


def rows_from_args(args: argparse.Namespace) -> list[Any]:
    """Plain, then one row per plugin the flags ask for (each alone); with ``--compile`` plain again and every
    plugin row, compiled."""
    from ..pipelines.bench import BenchRow

    seen: Counter = Counter()
    labelled = [(_label(plugin, seen), plugin) for plugin in plugins_from_args(args)]
    rows = [BenchRow("plain")] + [BenchRow(label, (plugin,)) for label, plugin in labelled]
    if args.compile is not None:
        rows += [BenchRow("plain + compile", compile=True)]
        rows += [BenchRow(f"{label} + compile", (plugin,), compile=True) for label, plugin in labelled]
    return rows


def bench_pipeline(model: str, random_weights: bool, dtype: Any, device: Any) -> Any:
    """The pipeline ``--model`` names, on ``device`` in ``dtype``.

    Raises:
        ValueError: a name that is neither a shape, a tiny model, a path nor a hub id, listing what is.
    """
    import torch

    from .. import testing
    from ..pipelines.loading import HUB_ID, REFERENCE_MODELS, load_pipeline
    from ..pipelines.model_shapes import SHAPES, random_pipeline

    if model in TINY_MODELS:
        pipe = getattr(testing, model.replace("-", "_"))().to(device)
        return pipe if dtype in (None, torch.float32) else pipe.to(dtype=dtype)  # built in float32
    if model in SHAPES or random_weights:
        return random_pipeline(model, dtype=dtype, device=device)
    if model in REFERENCE_MODELS or Path(model).expanduser().exists() or HUB_ID.fullmatch(model):
        return load_pipeline(model, dtype=dtype, device=device)
    raise ValueError(
        f"unknown model {model!r}; use a named shape ({', '.join(SHAPES)}), a tiny test model "
        f"({', '.join(TINY_MODELS)}), {' or '.join(map(repr, REFERENCE_MODELS))}, a diffusers folder "
        "or a hub id"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from ..pipelines.bench import bench_device, bench_dtype, benchmark, check_rows
    from ..pipelines.bench_report import format_table

    for name in ("height", "width", "steps", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = bench_device(args.device)
    dtype = bench_dtype(args.dtype, device)
    rows = rows_from_args(args)  # plugin flags are validated before any model is built
    pipe = bench_pipeline(args.model, args.random_weights, dtype, device)
    check_rows(pipe, rows)  # a plugin the model does not support fails here, before any timing
    report = benchmark(
        pipe,
        rows,
        height=args.height,
        width=args.width,
        steps=args.steps,
        repeats=args.repeats,
        warmup=args.warmup,
        model=args.model,
        compile_backend=args.compile or "inductor",
        keep_going=True,
        progress=not args.no_progress,
    )
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    failed = [row.label for row in report.rows if row.skipped]
    if failed:
        print(f"attnsurgery bench: {len(failed)} row(s) failed while timed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
