"""What every node of the pack shares: ComfyUI's class attributes, the model input and common knobs."""

from __future__ import annotations

from typing import Any

__all__ = ["ModelPatchNode", "LAYERS_INPUT", "SEED_INPUT"]

LAYERS_INPUT = (
    "STRING",
    {
        "default": "top",
        "tooltip": "Layers in diffusers names, as in the Python API: a group ('top': the "
        "highest-resolution level, 'mid', 'down', 'up', 'all'), an exact or "
        "enclosing path like 'down_blocks.0', or a glob ('*' within one path "
        "segment, '**' across); several separated by spaces, ';' or ','.",
    },
)
SEED_INPUT = (
    "INT",
    {
        "default": 0,
        "min": -1,
        "max": 2**31 - 1,
        "tooltip": "Seed of the random dst choice per cell; -1 always takes position 0.",
    },
)


class ModelPatchNode:
    """Base of the nodes: MODEL in, patched clone out; subclasses give ``DESCRIPTION``, ``inputs`` and ``patch``."""

    CATEGORY = "attnsurgery"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    DESCRIPTION = ""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # ComfyUI's name
        model = ("MODEL", {"tooltip": "The model to patch; it is cloned, never changed."})
        return {"required": {"model": model, **cls.inputs()}}

    @classmethod
    def inputs(cls) -> dict[str, Any]:
        """The node's inputs after ``model``, in ComfyUI's ``(type, options)`` form."""
        raise NotImplementedError
