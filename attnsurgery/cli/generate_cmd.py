"""``attnsurgery generate PROMPT``: images with plugins, each PNG carrying the parameters that made it."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from ..pipelines.metadata import GenerationParams, read_png_params, save_png
from .plugin_flags import add_plugin_flags, plugins_from_args

__all__ = ["register", "params_from_args"]


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "generate",
        help="generate images (default model: the shipped reference model, works offline)",
        description="Generate images; every PNG stores the full parameters (replay with --from-png).",
    )
    parser.add_argument("prompt", nargs="?", help="the text prompt (optional with --from-png)")
    parser.add_argument(
        "--model", default=None, help="'reference' (default), 'reference-flux', diffusers folder, hub id or single file"
    )
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 20)")
    parser.add_argument(
        "--cfg",
        type=float,
        default=None,
        help="classifier-free guidance scale (default: the reference model's own, 7.5 for other models)",
    )
    parser.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default: the model's native size)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the first image (default 0)")
    parser.add_argument("--num-images", type=int, default=1, help="images with seeds seed, seed+1, ...")
    parser.add_argument("--out", default="out", help="output folder (default ./out)")
    parser.add_argument("--from-png", default=None, help="replay the parameters stored in a PNG we wrote")
    parser.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: as stored)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_plugin_flags(parser)
    parser.set_defaults(run=run)


def _positive(name: str, value: int | float | None, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ValueError(f"--{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}")


def params_from_args(args: argparse.Namespace) -> GenerationParams:
    """Parameters from a PNG (if given) overridden by every flag given explicitly."""
    base = read_png_params(args.from_png) if args.from_png else None
    if base is None and not args.prompt:
        raise ValueError("give a PROMPT, or --from-png FILE to replay an image")
    for name in ("steps", "height", "width", "num_images"):
        _positive(name.replace("_", "-"), getattr(args, name))
    _positive("cfg", args.cfg, allow_zero=True)
    plugins = [plugin.to_dict() for plugin in plugins_from_args(args)]
    overrides = {
        "prompt": args.prompt,
        "model": args.model,
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "cfg": args.cfg,
        "height": args.height,
        "width": args.width,
        "seed": args.seed,
        "plugins": tuple(plugins) if plugins else None,
    }
    given = {key: value for key, value in overrides.items() if value is not None}
    if base is None:
        return GenerationParams(**given)
    return dataclasses.replace(base, **given)


def _file_name(params: GenerationParams, index: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", params.prompt.lower()).strip("-")[:48] or "image"
    return f"{index:03d}-seed{params.seed}-{slug}.png"


def run(args: argparse.Namespace) -> int:
    from ..pipelines.generate import generate
    from ..pipelines.loading import load_pipeline

    params = params_from_args(args)
    pipe = load_pipeline(params.model, dtype=args.dtype, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    existing = len(list(out.glob("*.png")))
    for offset, (image, used) in enumerate(generate(pipe, params, args.num_images, progress=not args.no_progress)):
        path = save_png(image, out / _file_name(used, existing + offset), used)
        print(path)
    return 0
