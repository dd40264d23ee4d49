"""Command-line flags for each plugin, shared by ``generate`` and ``eval``.

Each flag group turns its options into one plugin instance, so the CLI never re-implements a plugin:
it only builds the same frozen config the Python API takes.
"""

from __future__ import annotations

import argparse

from ..plugins.base import Plugin

__all__ = ["add_plugin_flags", "plugins_from_args"]


def add_plugin_flags(parser: argparse.ArgumentParser) -> None:
    """Add every plugin's flag group to ``parser``."""
    del parser  # the plugin flag groups register here as the plugins land


def plugins_from_args(args: argparse.Namespace) -> list[Plugin]:
    """The plugins the parsed flags ask for, in a fixed order."""
    del args
    return []
