"""The image-attending layers of a DiT, and installing the wrappers that restructure their joint attention
calls (neighborhood attention, token merging, agents)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..inventory import AttentionLayer
    from ..selectors import LayerSelector
    from ..surgery import Surgery

__all__ = ["IMAGE_KINDS", "image_layers", "layer_generator", "install_joint_processors"]

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


def layer_generator(surgery: Surgery, owner: object, path: str, seed: int | None) -> Callable[[], torch.Generator]:
    """A fresh private generator per call, keyed by the plugin, the layer and the step (reproducible whatever
    ran before; never the global RNG)."""
    context = surgery.context

    def generator() -> torch.Generator:
        return surgery.generator(type(owner).__name__, path, context.step_index, context.timestep, seed=seed)

    return generator


def install_joint_processors(
    surgery: Surgery,
    owner: object,
    selector: LayerSelector,
    seed: int | None,
    use_rand: bool,
    make_processor: Callable[..., Any],
) -> list[AttentionLayer]:
    """Wrap every selected image-attending layer with ``make_processor(inner, path=, text_first=, context=,
    generator=)`` under the ``tokens`` role; returns the layers."""
    layers = image_layers(surgery, selector)
    for layer in layers:
        processor = make_processor(
            layer.module.processor,
            path=layer.path,
            text_first=layer.text_placement == "first",
            context=surgery.context,
            generator=layer_generator(surgery, owner, layer.path, seed) if use_rand else None,
        )
        surgery.set_processor(layer, processor, role="tokens")
    return layers
