"""``attnsurgery convert-convfusion``: the authors' released ConvFusion weights -> an attnsurgery folder."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run"]


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "convert-convfusion",
        help="convert the released Delta-ConvFusion weights (SD1.5/SDXL) into a ConvFusion folder",
        description="Convert the official Delta-ConvFusion block weights for use with ConvFusion.from_pretrained "
        "(only the model's config is read, not its weights).",
    )
    parser.add_argument("weights", type=Path, help="the official .safetensors file")
    parser.add_argument("--model", required=True, help="the base model: diffusers folder (pipeline or unet) or hub id")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--gate",
        choices=("mul", "sigmoid"),
        default="mul",
        help="gate the weights were trained with: mul (released SD1.5/SDXL) or sigmoid",
    )
    parser.add_argument(
        "--skip-other-keys",
        action="store_true",
        help="ignore tensors that are no conv1 block weight (a whole saved ConvFusion UNet)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..convfusion.convert import convert_official
    from ..pipelines.loading import meta_denoiser, read_denoiser_spec

    denoiser = meta_denoiser(read_denoiser_spec(args.model))
    plugin = convert_official(args.weights, denoiser, gate=args.gate, skip_other_keys=args.skip_other_keys)
    folder = plugin.save(args.out)
    print(
        f"{len(plugin.blocks)} ConvFusion blocks written to {folder}; load them with "
        f"attnsurgery.ConvFusion.from_pretrained({str(folder)!r})"
    )
    return 0
