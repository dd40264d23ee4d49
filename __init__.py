"""ComfyUI's entry point when this repository is a custom node (registry, Manager, ``git clone`` into
``custom_nodes/``): it registers the nodes of ``attnsurgery/comfy``.

ComfyUI imports this file as a package, named after its folder (March 2024) or its path (newer). The node
mappings load lazily, on ComfyUI's first look at them, so importing this file alone (pytest, tools) does
nothing. They come from the library beside this file, loaded as the top-level package ``attnsurgery`` by its
location (no ``sys.path`` change: the clone's ``tests`` and ``examples`` stay out of ComfyUI's imports),
unless ``attnsurgery`` is imported already. Where an old ComfyUI registered this file as ``attnsurgery`` (a
folder of that name) the library takes that name back, so ``import attnsurgery`` finds the library.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

_LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attnsurgery")


def _library() -> ModuleType:
    """The attnsurgery library: the one imported already, else the copy beside this file."""
    loaded = sys.modules.get("attnsurgery")
    if loaded is not None and loaded is not sys.modules.get(__name__):
        return loaded
    spec = importlib.util.spec_from_file_location(
        "attnsurgery", os.path.join(_LIBRARY, "__init__.py"), submodule_search_locations=[_LIBRARY]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["attnsurgery"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["attnsurgery"]
        raise
    return module


def __getattr__(name: str) -> dict:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _library()
    return getattr(importlib.import_module("attnsurgery.comfy"), name)
