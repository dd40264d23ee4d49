"""Loads a folder as a custom node into a ComfyUI tree with that tree's own loader, in a fresh interpreter.

``python -m tests.support.comfy.custom_node_probe TREE NODE_FOLDER`` prints one JSON line: what the loader
returned, the node names it registered, and which ``attnsurgery`` the process holds afterwards. A fresh
process, because the point is a ComfyUI in which attnsurgery was never imported (a clone, no pip install).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import sys
from pathlib import Path

from .comfyui_trees import TREES, bootstrap


def main(tree_folder: str, node_folder: str) -> None:
    tree = next(tree for tree in TREES if Path(tree.locate()) == Path(tree_folder))
    nodes = bootstrap(tree, Path(tree_folder)).nodes
    probe = importlib.util.spec_from_file_location("probe", str(Path(node_folder) / "__init__.py"))
    importlib.util.module_from_spec(probe)
    probe.loader.exec_module(importlib.util.module_from_spec(probe))  # importing the entry point alone
    imported_alone = "attnsurgery" in sys.modules
    loaded = nodes.load_custom_node(node_folder)
    loaded = asyncio.run(loaded) if inspect.iscoroutine(loaded) else loaded  # async on newer ComfyUI
    library = sys.modules.get("attnsurgery")
    print(
        json.dumps(
            {
                "loaded": loaded,
                "imported_alone": imported_alone,
                "nodes": sorted(name for name in nodes.NODE_CLASS_MAPPINGS if name.startswith("AttnSurgery")),
                "library": getattr(library, "__file__", None),
                "has_apply": hasattr(library, "apply"),
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
