"""The node pack loads into ComfyUI's node registry the way a custom_nodes folder is loaded."""

from __future__ import annotations

import asyncio
import inspect
import sys

import attnsurgery.comfy as pack

INSTALL_INIT = (
    "from attnsurgery.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS\n"
    '__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]\n'
)


def test_custom_nodes_folder_registers_every_node(comfyui, tmp_path):
    folder = tmp_path / "attnsurgery_nodes"
    folder.mkdir()
    (folder / "__init__.py").write_text(INSTALL_INIT)
    registry = comfyui.nodes
    try:
        loaded = registry.load_custom_node(str(folder))
        assert (asyncio.run(loaded) if inspect.iscoroutine(loaded) else loaded) is True  # async on newer ComfyUI
    finally:
        # the folder's module name: its name (2024), its path with "." spelled "_x_" (newer)
        sys.modules.pop("attnsurgery_nodes", None)
        sys.modules.pop(str(folder).replace(".", "_x_"), None)
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert registry.NODE_CLASS_MAPPINGS[name] is cls
        assert registry.NODE_DISPLAY_NAME_MAPPINGS[name] == pack.NODE_DISPLAY_NAME_MAPPINGS[name]


def test_nodes_follow_comfyui_conventions(comfyui):
    assert pack.NODE_CLASS_MAPPINGS
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        inputs = cls.INPUT_TYPES()["required"]
        assert inputs["model"][0] == "MODEL"
        assert cls.RETURN_TYPES == ("MODEL",) and cls.CATEGORY == "attnsurgery"
        assert callable(getattr(cls(), cls.FUNCTION))
        assert cls.DESCRIPTION
        for spec in inputs.values():
            assert spec[1]["tooltip"]
