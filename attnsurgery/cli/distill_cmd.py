"""``attnsurgery distill``: train ConvFusion blocks that replace a U-Net's self-attention."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..distill import DistillConfig, distill
from ..distill.loss import LOSS_PRESETS
from ..pipelines.loading import load_pipeline

__all__ = ["distill_parser", "register", "run"]

DESCRIPTION = "Distil a U-Net's self-attention into pyramid depthwise-conv blocks."


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "distill",
        help="distil self-attention into ConvFusion conv blocks (frozen teacher, accelerate)",
        description=DESCRIPTION,
    )
    distill_parser(parser)
    parser.set_defaults(run=run)


def distill_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``attnsurgery distill`` arguments (added to ``parser`` when one is given)."""
    parser = parser or argparse.ArgumentParser(prog="attnsurgery distill", description=DESCRIPTION)
    defaults = DistillConfig()
    parser.add_argument(
        "--model", required=True, help="SD1.x/SD2.x/SDXL: reference, a diffusers folder, hub id or single file"
    )
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="prompts .txt file, folder of captioned images, or folder of latent shards",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--preset",
        choices=sorted(LOSS_PRESETS),
        default=defaults.preset,
        help="loss weights: convfusion (1, 1, 0.001) or linfusion (1, 0.5, 0.5)",
    )
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument(
        "--cooldown-steps",
        type=int,
        default=defaults.cooldown_steps,
        help="let the learning rate fall linearly to 0 over the last N steps",
    )
    parser.add_argument("--resolution", type=int, default=None, help="pixels; default: the model's native size")
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=defaults.mixed_precision)
    parser.add_argument(
        "--min-snr-gamma",
        type=float,
        default=defaults.min_snr_gamma,
        help="Min-SNR gamma; 0 turns the weighting off",
    )
    parser.add_argument("--kernel-size", type=int, default=None, help="one kernel size for every block")
    parser.add_argument("--gate", choices=("mul", "div", "sigmoid"), default=defaults.gate)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a distillation from parsed ``distill_parser`` arguments; returns the exit status."""
    config = DistillConfig(
        preset=args.preset,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        warmup_steps=args.warmup_steps,
        cooldown_steps=args.cooldown_steps,
        resolution=args.resolution,
        checkpoint_every=args.checkpoint_every,
        gradient_checkpointing=args.gradient_checkpointing,
        mixed_precision=args.mixed_precision,
        min_snr_gamma=args.min_snr_gamma or None,
        kernel_size=args.kernel_size,
        gate=args.gate,
        seed=args.seed,
    )
    pipe = load_pipeline(args.model)
    result = distill(pipe, args.data, args.out, config, resume=args.resume)
    last = result.history[-1]["loss"] if result.history else float("nan")
    print(
        f"ConvFusion blocks saved to {result.folder} (final loss {last:.4f}); load them with "
        f"attnsurgery.ConvFusion.from_pretrained({str(result.folder)!r})"
    )
    return 0
