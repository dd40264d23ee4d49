"""The image-attending layers of a DiT, and installing the wrappers that restructure their joint attention
calls (neighborhood attention, token merging, agents)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..inventory import AttentionLayer
    from ..rng import CallInt
    from ..selectors import LayerSelector
    from ..surgery import Surgery

__all__ = ["IMAGE_KINDS", "image_layers", "layer_seed", "install_joint_processors"]

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


def layer_seed(surgery: Surgery, owner: object, path: str, seed: int | None) -> CallInt:
    """A private seed per call, keyed by the plugin, the layer and the step (reproducible whatever ran before;
    never the global RNG), computed before the call so a compiled denoiser reads it as a tensor."""
    return surgery.call_seed(type(owner).__name__, path, seed=seed)


def install_joint_processors(
    surgery: Surgery,
    owner: object,
    selector: LayerSelector,
    seed: int | None,
    use_rand: bool,
    make_processor: Callable[..., Any],
) -> list[AttentionLayer]:
    """Wrap every selected image-attending layer with ``make_processor(inner, path=, text_first=, context=,
    seed=)`` under the ``tokens`` role; returns the layers."""
    layers = image_layers(surgery, selector)
    for layer in layers:
        processor = make_processor(
            layer.module.processor,
            path=layer.path,
            text_first=layer.text_placement == "first",
            context=surgery.context,
            seed=layer_seed(surgery, owner, layer.path, seed) if use_rand else None,
        )
        surgery.set_processor(layer, processor, role="tokens")
    return layers
