"""Command-line flags for each plugin, shared by ``generate`` and ``eval``.

Each flag group only builds the frozen config the Python API takes, so the CLI never re-implements a
plugin; validation and its error messages come from the plugin's own ``__post_init__``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..ops.rope_scaling import ROPE_SCALINGS
from ..plugins.base import Plugin, plugin_from_dict
from ..plugins.neighborhood import BACKEND_CHOICES
from ..selectors import split_items

__all__ = ["add_plugin_flags", "plugins_from_args", "plugins_from_json"]


def _items(text: str | None) -> tuple[str, ...] | None:
    """Selector items of a flag, split as the library splits a spec given as one string ('a:0,3,b')."""
    return None if text is None else tuple(split_items(text))


def _size(text: str) -> int | tuple[int, int]:
    """``"8"`` -> 8, ``"8x16"`` -> (8, 16): a size flag in tokens (rows x cols)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"give N or RxC in tokens (e.g. 64 or 64x96), got {text!r}")
    values = tuple(int(p) for p in parts)
    return values[0] if len(values) == 1 else values


def _size_or_native(text: str) -> str | int | tuple[int, int]:
    return "native" if text == "native" else _size(text)


def add_plugin_flags(parser: argparse.ArgumentParser) -> None:
    """Add every plugin's flag group to ``parser``."""
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="JSON",
        help='any plugin as JSON, e.g. \'{"type": "HiDiffusion"}\' (repeatable)',
    )
    hd = parser.add_argument_group("HiDiffusion (RAU-Net + MSW-MSA, U-Nets above native size)")
    hd.add_argument("--hidiffusion", action="store_true", help="enable HiDiffusion")
    hd.add_argument("--hd-t1", type=float, default=None, help="ratio of steps for the T1 modules (preset)")
    hd.add_argument("--hd-t2", type=float, default=None, help="ratio of steps for the T2 modules (preset)")
    hd.add_argument("--hd-no-raunet", action="store_true", help="windows only, no feature resizing")
    hd.add_argument("--hd-no-window-attn", action="store_true", help="RAU-Net only, global attention")
    hd.add_argument("--hd-force", action="store_true", help="act at or below native size too")

    na = parser.add_argument_group("Neighborhood attention (DiTs above native size)")
    na.add_argument("--na", action="store_true", help="enable neighborhood attention")
    na.add_argument("--na-window", type=_size_or_native, default="native", help="'native', N or RxC tokens")
    na.add_argument("--na-stride", type=_size, default=1, help="N or RxC: queries per shared window (GNA)")
    na.add_argument("--na-dilation", type=_size, default=1, help="N or RxC: attend every N-th token")
    na.add_argument("--na-layers", default=None, help="comma-separated layer selectors (default: all)")
    na.add_argument("--na-start", type=float, default=0.0, help="progress where local attention begins")
    na.add_argument("--na-stop", type=float, default=1.0, help="progress where it ends")
    na.add_argument("--na-backend", default="auto", choices=BACKEND_CHOICES, help="the op's backend")
    na.add_argument("--na-proportional", action="store_true", help="entropy-keeping scale on global calls")
    na.add_argument("--na-rope", default=None, choices=ROPE_SCALINGS, help="stretch FLUX-family RoPE")
    na.add_argument("--na-force", action="store_true", help="act at or below native size too")

    agent = parser.add_argument_group("Agent attention (AgentSD) and token merging")
    agent.add_argument("--agent", action="store_true", help="enable agent attention on the top level")
    agent.add_argument("--agent-source", choices=("tome", "pool"), default="tome", help="how agents are made")
    agent.add_argument("--agent-layers", default=None, help="layer selector (default: top on U-Nets, all on DiTs)")
    agent.add_argument("--tome", type=float, default=None, metavar="RATIO", help="token merging at this ratio")
    agent.add_argument("--tome-mode", default="qkv", choices=("qkv", "kv"), help="qkv: ToMe; kv: DiT keys/values only")

    pag = parser.add_argument_group("Perturbed-attention guidance (layers or single heads)")
    pag.add_argument("--pag", type=float, default=None, metavar="SCALE", help="guidance scale (e.g. 3.0)")
    pag.add_argument("--pag-layers", default=None, help="comma-separated layer selectors (family default)")
    pag.add_argument(
        "--pag-heads", default=None, help="comma-separated 'path:head' or 'path:h1,h2' items, or a head-set JSON file"
    )
    pag.add_argument("--pag-soft", type=float, default=1.0, help="SoftPAG blend u in [0, 1] (default 1)")
    pag.add_argument("--pag-kind", default="identity", choices=("identity", "uniform", "mean_query", "temperature"))
    pag.add_argument("--pag-mode", default="batched", choices=("batched", "sequential"))

    conv = parser.add_argument_group("Convolution-distilled replacements")
    conv.add_argument("--convfusion", default=None, metavar="DIR", help="load distilled conv blocks from DIR")


def plugins_from_json(texts: list[str]) -> list[Plugin]:
    """Plugins given as ``--plugin JSON`` (``to_dict`` form); a bad one fails before any model loads."""
    plugins = []
    for text in texts:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            raise ValueError(f'--plugin takes a JSON object such as \'{{"type": "HiDiffusion"}}\', got {text!r}')
        plugins.append(plugin_from_dict(data))
    return plugins


def plugins_from_args(args: argparse.Namespace) -> list[Plugin]:
    """Every plugin the parsed flags ask for: ``--plugin`` JSON first, then the flag groups in a fixed order
    (structure first, guidance last)."""
    from ..convfusion import ConvFusion
    from ..plugins.agent import AgentAttention
    from ..plugins.hidiffusion import HiDiffusion
    from ..plugins.neighborhood import NeighborhoodAttention
    from ..plugins.perturbation import PerturbedAttention
    from ..plugins.token_merging import TokenMerging

    plugins = plugins_from_json(args.plugin)
    if args.convfusion:
        plugins.append(ConvFusion.from_pretrained(args.convfusion))
    if args.hidiffusion:
        plugins.append(
            HiDiffusion(
                raunet=not args.hd_no_raunet,
                window_attn=not args.hd_no_window_attn,
                t1=args.hd_t1,
                t2=args.hd_t2,
                force=args.hd_force,
            )
        )
    if args.na:
        plugins.append(
            NeighborhoodAttention(
                window=args.na_window,
                stride=args.na_stride,
                dilation=args.na_dilation,
                layers=_items(args.na_layers) or "all",
                start=args.na_start,
                stop=args.na_stop,
                backend=args.na_backend,
                force=args.na_force,
                proportional=args.na_proportional,
                rope=args.na_rope,
            )
        )
    if args.agent:
        plugins.append(AgentAttention(layers=_items(args.agent_layers), agent_source=args.agent_source))
    if args.tome is not None:
        plugins.append(TokenMerging(ratio=args.tome, mode=args.tome_mode))
    if args.pag is not None:
        heads = args.pag_heads
        heads = Path(heads) if heads and heads.endswith(".json") else _items(heads)
        plugins.append(
            PerturbedAttention(
                scale=args.pag,
                layers=_items(args.pag_layers),
                heads=heads,
                soft=args.pag_soft,
                kind=args.pag_kind,
                mode=args.pag_mode,
            )
        )
    return plugins
