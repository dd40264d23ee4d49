"""``attnsurgery distill``: train ConvFusion blocks that replace a U-Net's self-attention."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(commands: argparse._SubParsersAction) -> None:
    from ..plugins.distill import distill_from_args, distill_parser

    parser = commands.add_parser(
        "distill", help="distil self-attention into ConvFusion conv blocks (frozen teacher, accelerate)",
        description="Distil a U-Net's self-attention into pyramid depthwise-conv blocks.",
    )
    distill_parser(parser)
    parser.set_defaults(run=distill_from_args)
