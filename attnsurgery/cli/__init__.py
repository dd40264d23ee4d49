"""The ``attnsurgery`` command line: one module per subcommand, each adding its own parser."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import bench_cmd, convert_cmd, distill_cmd, eval_cmd, generate_cmd, hunt_cmd, inspect_cmd

__all__ = ["main", "build_parser"]

SUBCOMMANDS = (inspect_cmd, generate_cmd, eval_cmd, bench_cmd, hunt_cmd, distill_cmd, convert_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnsurgery", description="Attention surgery for diffusion pipelines.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``attnsurgery`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (FileNotFoundError, NotImplementedError, ValueError, OSError) as error:
        print(f"attnsurgery {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
