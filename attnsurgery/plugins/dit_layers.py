"""The image-attending layers of a DiT, for the plugins that restructure its joint attention calls."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..inventory import AttentionLayer
    from ..selectors import LayerSelector
    from ..surgery import Surgery

__all__ = ["IMAGE_KINDS", "image_layers"]

#: Layer kinds that attend over the image tokens (text-only refiner layers are left alone).
IMAGE_KINDS = ("self", "joint", "single")


def image_layers(surgery: Surgery, selector: LayerSelector) -> list[AttentionLayer]:
    """The selected image-attending layers, each with a declared text placement (a clear error otherwise)."""
    layers = surgery.model.select(selector, kinds=IMAGE_KINDS)
    for layer in layers:
        if layer.text_placement is None:
            raise ValueError(
                f"layer {layer.path!r} of {surgery.model.family.name} has no declared text placement, so its image "
                "tokens cannot be found; leave it out with layers=... (or report the family: its placement must "
                "be declared)"
            )
    return layers
