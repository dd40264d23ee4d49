"""``attnsurgery inspect MODEL``: the attention layers of a model and where the attention FLOPs go."""

from __future__ import annotations

import argparse

from ..inventory import ModelInfo, describe
from ..pipelines.loading import meta_denoiser, read_denoiser_spec

__all__ = ["register", "render_table"]


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "inspect",
        help="list attention layers with heads, token grid and share of attention FLOPs",
        description="List a model's attention layers (no weights are loaded).",
    )
    parser.add_argument("model", help="local diffusers folder (pipeline or unet/transformer) or hub id")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (default: native)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (default: native)")
    parser.set_defaults(run=run)


def render_table(info: ModelInfo, height: int, width: int) -> str:
    """The inspect table: one row per attention layer, then the total. ``tokens`` is the image-token grid (the
    typical text-token count on text-only layers), ``text`` where the layer's non-image tokens sit."""
    factor = info.family.vae_scale_factor
    latent = (max(1, height // factor), max(1, width // factor))
    flops = [info.attention_flops(layer, latent) for layer in info.layers]
    total = sum(flops) or 1
    rows = [("layer", "kind", "heads", "head_dim", "tokens", "FLOPs %", "text")]
    for layer, layer_flops in zip(info.layers, flops):
        h, w = info.token_grid(layer, latent)
        rows.append(
            (
                layer.path,
                layer.kind,
                str(layer.heads),
                str(layer.head_dim),
                f"text:{info.family.text_tokens}" if layer.kind == "text" else f"{h}x{w}",
                f"{100 * layer_flops / total:.2f}",
                layer.text_placement or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        f"{info.family.name} ({info.family.kind}), native {info.family.native_resolution}px, "
        f"image {height}x{width}, latent {latent[0]}x{latent[1]}",
    ]
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(row[2:-1], widths[2:-1])] + [row[-1].ljust(widths[-1])]
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(f"{len(info.layers)} attention layers, {total / 1e9:.2f} GFLOPs of attention per image and call")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be a positive number of pixels, got {value}")
    spec = read_denoiser_spec(args.model)
    info = describe(meta_denoiser(spec), spec.vae_scale_factor)
    native = info.family.native_resolution
    print(render_table(info, args.height or native, args.width or native))
    return 0
