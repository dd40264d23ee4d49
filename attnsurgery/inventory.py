"""The attention layers of a denoiser, with what plugins need to know about each.

One pass over ``named_modules()`` turns a denoiser into a list of :class:`AttentionLayer` records
(path, kind, heads, resolution level or block index). Selectors, presets, the CLI's ``inspect`` table
and every plugin read this list instead of walking the module tree themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from .families import Family, detect_family

__all__ = [
    "AttentionLayer",
    "LayerKind",
    "TextPlacement",
    "ModelInfo",
    "describe",
    "is_attention_module",
    "level_grid",
    "token_grids",
    "find_token_grid",
]

LayerKind = Literal["self", "cross", "joint", "single", "text"]
TextPlacement = Literal["first", "last"]

# DiT block lists whose layers are of one kind whatever their modules look like: FLUX-like single-stream
# blocks and Z-Image's joint ``layers`` attend over one concatenated sequence, Z-Image's ``noise_refiner`` over
# image tokens (and pads) only, its ``context_refiner`` over caption tokens only.
_BLOCK_KINDS: dict[str, LayerKind] = {
    "single_transformer_blocks": "single",
    "layers": "single",
    "noise_refiner": "self",
    "context_refiner": "text",
}

#: U-Net levels a token count is looked up in: more 2x downsamplings than any supported U-Net has.
MAX_LEVELS = 8


def is_attention_module(module: torch.nn.Module) -> bool:
    """A diffusers attention module: it owns a swappable ``processor`` and knows its head count."""
    return hasattr(module, "set_processor") and hasattr(module, "processor") and hasattr(module, "heads")


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module of a denoiser.

    Attributes:
        path: exact module path inside the denoiser (``down_blocks.0.attentions.1.transformer_blocks.0.attn1``).
        module: the attention module itself.
        kind: ``self`` (image tokens attend to image tokens), ``cross`` (image to text),
            ``joint`` (MMDiT: image and text streams attend jointly), ``single`` (FLUX single-stream block,
            Z-Image main layer: one concatenated text+image sequence), ``text`` (text tokens only: Z-Image's
            ``context_refiner``; image plugins skip these).
        heads: number of attention heads.
        head_dim: channels per head.
        level: U-Net resolution level (0 = full latent resolution, +1 per 2x downsampling); None on DiTs.
        block_index: DiT block number, counted along the block lists in the order the forward runs them
            (FLUX: double-stream blocks, then single-stream ones; Z-Image: ``noise_refiner``,
            ``context_refiner``, then ``layers``); None on U-Nets.
        text_placement: where the non-image tokens (text, and pad tokens) sit in the sequence that reaches
            this layer's scaled_dot_product_attention call: ``"first"`` (FLUX-likes, Qwen-Image: [text, image])
            or ``"last"`` (SD3, Z-Image: [image, text, pads]; image-only DiT layers: [image, pads]). Declared
            from the family, never guessed from shapes. None on U-Nets and on text-only layers.
    """

    path: str
    module: torch.nn.Module = field(repr=False, compare=False)
    kind: LayerKind
    heads: int
    head_dim: int
    level: int | None = None
    block_index: int | None = None
    text_placement: TextPlacement | None = None

    @property
    def is_self_attention(self) -> bool:
        """True where image tokens attend to themselves (self, joint and single layers)."""
        return self.kind in ("self", "joint", "single")


def level_grid(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    """Token grid of a U-Net resolution level: every stride-2 conv maps a side ``s`` to ``ceil(s / 2)``."""
    h, w = latent_hw
    scale = 2**level
    return math.ceil(h / scale), math.ceil(w / scale)


def _is_unet(family: Family | None) -> bool:
    return family is None or family.kind == "unet"


def token_grids(latent_hw: tuple[int, int], family: Family | None = None) -> list[tuple[int, int]]:
    """Image-token grids (rows, cols) a denoiser call on a latent of ``latent_hw`` cells can attend over.

    On a U-Net (``family`` one, or None) one grid per resolution level, finest first; on a DiT its patch grid.
    """
    if _is_unet(family):
        return [level_grid(latent_hw, level) for level in range(MAX_LEVELS)]
    p = family.patch_size
    return [(math.ceil(latent_hw[0] / p), math.ceil(latent_hw[1] / p))]


def find_token_grid(latent_hw: tuple[int, int], num_tokens: int, family: Family | None = None) -> tuple[int, int]:
    """The grid of :func:`token_grids` that holds ``num_tokens`` tokens: the layout of an attention call.

    The count, not the layer's usual level, decides: a plugin that resizes features (RAU-Net) moves a layer
    to another level's grid.

    Raises:
        ValueError: no grid of that latent holds that many tokens (e.g. a text sequence).
    """
    grids = token_grids(latent_hw, family)
    for grid in grids:
        if grid[0] * grid[1] == num_tokens:
            return grid
    where = "level" if _is_unet(family) else "token grid"
    raise ValueError(
        f"{num_tokens} tokens match no {where} of a {latent_hw[0]}x{latent_hw[1]} latent (token grids: "
        f"{grids[:5]}); is this layer attending over image tokens?"
    )


def _unet_level(path: str, num_levels: int) -> int | None:
    head, _, rest = path.partition(".")
    if head == "mid_block":
        return num_levels - 1
    index = int(rest.split(".", 1)[0]) if rest[:1].isdigit() else None
    if index is None:
        return None
    if head == "down_blocks":
        return index
    if head == "up_blocks":
        return num_levels - 1 - index
    return None


def _layer_kind(path: str, module: torch.nn.Module, family: Family) -> LayerKind:
    if family.kind == "unet":
        return "cross" if getattr(module, "is_cross_attention", False) else "self"
    root = path.split(".", 1)[0]
    if root in _BLOCK_KINDS and root in family.blocks:
        return _BLOCK_KINDS[root]
    has_text_stream = getattr(module, "added_kv_proj_dim", None) is not None
    return "joint" if has_text_stream else "self"


def _text_placement(kind: LayerKind, family: Family) -> TextPlacement | None:
    """Joint sequences follow the family's order; an image-only DiT layer's extra tokens (Z-Image's pads)
    come after the image tokens."""
    if family.kind == "unet" or kind == "text":
        return None
    if kind in ("joint", "single") and family.joint_order == "text_image":
        return "first"
    return "last"


def _dit_block_index(path: str, denoiser: torch.nn.Module, family: Family) -> int | None:
    parts = path.split(".")
    if len(parts) < 2 or not parts[1].isdigit() or parts[0] not in family.blocks:
        return None
    earlier = family.blocks[: family.blocks.index(parts[0])]
    return sum(len(getattr(denoiser, name, ())) for name in earlier) + int(parts[1])


def _head_dim(module: torch.nn.Module, heads: int) -> int:
    """Channels per head: FLUX.2's single-stream attention fuses its projections (no ``to_q``) but records it."""
    head_dim = getattr(module, "head_dim", None)
    return int(head_dim) if head_dim else module.to_q.out_features // heads


@dataclass(frozen=True)
class ModelInfo:
    """A denoiser's family and attention layers: the map every selector and preset reads.

    Example:
        >>> info = describe(pipe.unet, vae_scale_factor=8)
        >>> [layer.path for layer in info.select("top", kinds=("self",))][:1]
        ['down_blocks.0.attentions.0.transformer_blocks.0.attn1']
    """

    family: Family
    layers: tuple[AttentionLayer, ...]
    num_levels: int = 1
    layer_noun: str = "attention layer"  # what ``layers`` hold, in error messages

    def layer(self, path: str) -> AttentionLayer:
        """The layer at an exact path (ValueError listing the layers if there is none)."""
        for layer in self.layers:
            if layer.path == path:
                return layer
        from .selectors import no_match_error

        raise no_match_error(path, self)

    def select(self, selector, kinds: tuple[LayerKind, ...] | None = None) -> list[AttentionLayer]:
        """Layers matched by a selector (see :mod:`attnsurgery.selectors`), optionally only of some kinds."""
        from .selectors import select_layers

        return select_layers(self, selector, kinds)

    def select_heads(self, spec, kinds: tuple[LayerKind, ...] | None = None) -> dict[str, frozenset[int] | None]:
        """Heads matched by a head spec: ``{layer path: heads}`` (None = every head of that layer)."""
        from .selectors import select_heads

        return select_heads(self, spec, kinds)

    def token_grid(self, layer: AttentionLayer, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Image-token grid a layer sees for a latent of ``latent_hw`` cells."""
        if layer.level is not None:
            return level_grid(latent_hw, layer.level)
        return token_grids(latent_hw, self.family)[0]

    def attention_flops(self, layer: AttentionLayer, latent_hw: tuple[int, int]) -> int:
        """FLOPs of the attention core (Q K^T and A V, 2 FLOPs per multiply-add) for one image."""
        h, w = self.token_grid(layer, latent_hw)
        image, text = h * w, self.family.text_tokens
        queries = {"joint": image + text, "single": image + text, "text": text}.get(layer.kind, image)
        keys = text if layer.kind == "cross" else queries
        return 4 * queries * keys * layer.heads * layer.head_dim


def describe(denoiser: torch.nn.Module, vae_scale_factor: int | None = None) -> ModelInfo:
    """Family and attention inventory of a denoiser (read-only: nothing is changed).

    Args:
        denoiser: a diffusers denoiser of a supported family (``attnsurgery.families.SUPPORTED_DENOISERS``).
        vae_scale_factor: pixels per latent cell, when known from the pipeline.
    """
    family = detect_family(denoiser, vae_scale_factor)
    num_levels = len(getattr(denoiser, "down_blocks", ())) or 1
    layers = []
    for path, module in denoiser.named_modules():
        if not path or not is_attention_module(module):
            continue
        heads = int(module.heads)
        unet = family.kind == "unet"
        kind = _layer_kind(path, module, family)
        layers.append(
            AttentionLayer(
                path=path,
                module=module,
                kind=kind,
                heads=heads,
                head_dim=_head_dim(module, heads),
                level=_unet_level(path, num_levels) if unet else None,
                block_index=None if unet else _dit_block_index(path, denoiser, family),
                text_placement=_text_placement(kind, family),
            )
        )
    return ModelInfo(family, tuple(layers), num_levels)
