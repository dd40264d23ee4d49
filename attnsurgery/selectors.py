"""Exact, anchored addressing of attention layers and heads.

A layer selector is one of, or a list of:
- an exact module path: ``"down_blocks.0.attentions.1.transformer_blocks.0.attn1"``;
- the path of an enclosing module, which selects every attention layer below it:
  ``"transformer_blocks.1"`` (never ``transformer_blocks.10``: matching is anchored at dots);
- a glob, where ``*`` matches inside one path segment, ``**`` across segments and ``?`` one character:
  ``"up_blocks.*.attentions.*"``;
- a named group: ``"top"`` (the highest-resolution attention level of a U-Net), ``"mid"``, ``"down"``,
  ``"up"``, ``"all"``; on DiTs ``"all"``, and ``"joint"`` (two-stream layers) and ``"single"`` (one
  concatenated sequence: FLUX-like single-stream blocks, Z-Image's main layers) where the model has them.

A head spec adds heads to that: ``"path:head"`` or ``"path:h1,h2"`` (the path as above, the heads integer
indices) or ``(block_index, head)`` for DiTs (blocks counted in the order the forward runs them: FLUX's
double-stream blocks, then the single-stream ones; Z-Image's noise refiners, context refiners, then layers).
Anything that matches nothing raises a ``ValueError`` that lists the layers that exist.
Where a spec arrives as one string (a ComfyUI input, a CLI flag), :func:`split_items` cuts it into items.

Example (``info = describe(pipe.transformer)`` for an SD3 pipeline):
    >>> [layer.path for layer in info.select("transformer_blocks.1")]  # block 1's attention, not block 10's
    ['transformer_blocks.1.attn']
    >>> heads = info.select_heads(["transformer_blocks.11:15,16", (3, 0)])  # layer path -> set of heads
    >>> {path: sorted(chosen) for path, chosen in heads.items()}
    {'transformer_blocks.3.attn': [0], 'transformer_blocks.11.attn': [15, 16]}
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .inventory import AttentionLayer, LayerKind, ModelInfo

__all__ = [
    "LayerSelector",
    "HeadSpec",
    "select_layers",
    "select_heads",
    "no_match_error",
    "groups_of",
    "split_items",
]

LayerSelector = str | Sequence[str]
HeadSpec = str | tuple[int, int] | Sequence[str | tuple[int, int]]

UNET_GROUPS = ("top", "mid", "down", "up", "all")
DIT_GROUPS = ("all", "joint", "single")


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    """Glob -> regex anchored at both ends; a match may stop at any dot (selecting a subtree)."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("(?:" + "".join(out) + r")(?:\..+)?")


def groups_of(info: ModelInfo) -> tuple[str, ...]:
    """Named groups that exist for this model."""
    if info.family.kind == "unet":
        return UNET_GROUPS
    kinds = {layer.kind for layer in info.layers}
    return tuple(group for group in DIT_GROUPS if group == "all" or group in kinds)


def _group_members(info: ModelInfo, name: str) -> list[AttentionLayer]:
    layers = info.layers
    if name == "all":
        return list(layers)
    if info.family.kind == "unet":
        if name == "top":
            top = min(layer.level for layer in layers if layer.level is not None)
            return [layer for layer in layers if layer.level == top]
        prefix = {"mid": "mid_block.", "down": "down_blocks.", "up": "up_blocks."}[name]
        return [layer for layer in layers if layer.path.startswith(prefix)]
    return [layer for layer in layers if layer.kind == name]


def no_match_error(selector: object, info: ModelInfo, kinds: Iterable[str] | None = None) -> ValueError:
    """The error for a selector that matches nothing: it lists what exists, so the fix is a copy-paste."""
    shown = [layer for layer in info.layers if kinds is None or layer.kind in kinds]
    listing = "\n".join(f"  {layer.path}  ({layer.kind}, {layer.heads} heads)" for layer in shown)
    what = f" of kind {'/'.join(kinds)}" if kinds else ""
    noun = info.layer_noun
    return ValueError(
        f"selector {selector!r} matches no {noun}{what} of this {info.family.name} model. "
        f"Use an exact path, an enclosing module path, a glob ('*' within a segment, '**' across), "
        f"or a group ({', '.join(groups_of(info))}). {noun.capitalize()}s:\n{listing}"
    )


def _match_one(info: ModelInfo, selector: str) -> list[AttentionLayer]:
    if selector in UNET_GROUPS + DIT_GROUPS:
        if selector not in groups_of(info):
            raise ValueError(
                f"group {selector!r} does not exist on a {info.family.name} ({info.family.kind}) model; "
                f"its groups are {', '.join(groups_of(info))}"
            )
        return _group_members(info, selector)
    regex = _compile(selector)
    return [layer for layer in info.layers if regex.fullmatch(layer.path)]


def select_layers(
    info: ModelInfo, selector: LayerSelector, kinds: tuple[LayerKind, ...] | None = None
) -> list[AttentionLayer]:
    """Layers matched by one selector or a list of them, in model order, each once.

    Raises:
        ValueError: a selector (or any item of a list) matches nothing of the requested kinds.
    """
    items = [selector] if isinstance(selector, str) else list(selector)
    if not items:
        raise ValueError("empty layer selector: give a path, glob or group such as 'top' or 'all'")
    chosen: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"layer selector items must be strings, got {item!r} ({type(item).__name__})")
        matched = [layer for layer in _match_one(info, item) if kinds is None or layer.kind in kinds]
        if not matched:
            raise no_match_error(item, info, kinds)
        chosen.update(layer.path for layer in matched)
    return [layer for layer in info.layers if layer.path in chosen]


def split_items(text: str) -> list[str]:
    """The items of a selector or head spec written as one string (a ComfyUI input, a CLI flag).

    Items are separated by whitespace, ``;`` or ``,``; a bare head index belongs to the ``path:h1,h2`` item
    before it (no layer path is a bare number), so ``"a:0,3 b"`` and ``"a:0,3,b"`` are ``["a:0,3", "b"]``.

    Example:
        >>> split_items("up_blocks.1.attentions.0:0,3 mid_block; top")
        ['up_blocks.1.attentions.0:0,3', 'mid_block', 'top']
    """
    items: list[str] = []
    for piece in re.split(r"[\s;,]+", text):
        if piece.isdigit() and items and ":" in items[-1]:
            items[-1] += "," + piece
        elif piece:
            items.append(piece)
    return items


def _parse_heads(item: str, path: str, head_text: str) -> tuple[int, ...]:
    parts = [part.strip() for part in head_text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise ValueError(
            f"head spec {item!r}: the part after ':' must be a head index or several, comma-separated, "
            f"e.g. '{path}:0' or '{path}:0,3'"
        )
    return tuple(int(part) for part in parts)


def _parse_head_item(info: ModelInfo, item, kinds) -> tuple[list[AttentionLayer], tuple[int, ...] | None]:
    if isinstance(item, tuple) and len(item) == 2 and all(isinstance(v, int) for v in item):
        block, head = item
        if info.family.kind == "unet":
            raise ValueError(
                f"head {item!r}: (block_index, head) addresses DiT blocks; on a U-Net use 'path:head', "
                "e.g. 'mid_block.attentions.0.transformer_blocks.0.attn1:3'"
            )
        layers = [
            layer for layer in info.layers if layer.block_index == block and (kinds is None or layer.kind in kinds)
        ]
        if not layers:
            blocks = sorted({layer.block_index for layer in info.layers if layer.block_index is not None})
            raise ValueError(
                f"head {item!r}: no block {block}; this {info.family.name} model has blocks {blocks[0]}..{blocks[-1]}"
            )
        return layers, (head,)
    if not isinstance(item, str):
        raise ValueError(f"head spec items are 'path:head' strings or (block, head) tuples, got {item!r}")
    path, sep, head_text = item.rpartition(":")
    if not sep:
        return select_layers(info, item, kinds), None
    heads = _parse_heads(item, path, head_text)
    return select_layers(info, path, kinds), heads


def select_heads(
    info: ModelInfo, spec: HeadSpec, kinds: tuple[LayerKind, ...] | None = None
) -> dict[str, frozenset[int] | None]:
    """Resolve a head spec to ``{layer path: heads}``; a plain layer selector means every head (None).

    A layer named by several items gets the union of their heads (every head if one item names it plainly).

    Raises:
        ValueError: nothing matches, or a head index is out of range for its layer.
    """
    items = (
        [spec]
        if isinstance(spec, str)
        or (isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(v, int) for v in spec))
        else list(spec)
    )
    if not items:
        raise ValueError(
            "empty head spec: give layer selectors (every head), 'path:h1,h2' items or, on DiTs, "
            "(block_index, head) tuples"
        )
    heads: dict[str, set[int] | None] = {}
    for item in items:
        layers, wanted = _parse_head_item(info, item, kinds)
        for layer in layers:
            if wanted is None:
                heads[layer.path] = None
                continue
            for head in wanted:
                if not 0 <= head < layer.heads:
                    raise ValueError(
                        f"head {head} in {item!r} is out of range: {layer.path} has heads 0..{layer.heads - 1}"
                    )
            current = heads.setdefault(layer.path, set())
            if current is not None:
                current.update(wanted)
    order = {layer.path: i for i, layer in enumerate(info.layers)}
    return {
        path: (None if value is None else frozenset(value))
        for path, value in sorted(heads.items(), key=lambda kv: order[kv[0]])
    }
