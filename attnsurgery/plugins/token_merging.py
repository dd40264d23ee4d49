"""Token merging (ToMe for SD) as a plugin: fewer tokens through the top-level self-attention layers."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..processors.joint_merge import MERGE_MODES, JointMergeProcessor
from ..processors.token_merge import BlockInput, TokenMergeProcessor, check_cells, check_fraction
from ..selectors import LayerSelector
from .base import Plugin, normalize_layers
from .dit_layers import install_joint_processors, layer_seed

if TYPE_CHECKING:
    from ..inventory import AttentionLayer
    from ..surgery import Surgery

__all__ = ["TokenMerging", "install_merging", "check_cells", "check_fraction"]

ProcessorFactory = Callable[..., Any]


def _block_of(surgery: Surgery, layer: AttentionLayer) -> torch.nn.Module | None:
    """The transformer block whose ``attn1`` is this layer (its input is ToMe's matching metric)."""
    parent_path = layer.path.rpartition(".")[0]
    parent = surgery.denoiser.get_submodule(parent_path) if parent_path else None
    return parent if getattr(parent, "attn1", None) is layer.module else None


def install_merging(
    surgery: Surgery,
    plugin: Plugin,
    layers: LayerSelector,
    seed: int | None,
    use_rand: bool,
    make_processor: ProcessorFactory,
    extra_roles: tuple[str, ...] = (),
) -> None:
    """Wrap the processors of the selected self-attention layers with merging processors.

    Each layer gets its own :class:`BlockInput`, fed by a pre-hook on its transformer block (layers
    outside such a block match on their own input), and a private seed per call keyed by the
    plugin, the layer and the step, so a run is reproducible whatever ran before it.

    Args:
        surgery: the surgery recording the changes.
        plugin: the plugin (its class name keys the generators).
        layers: layer selector; only self-attention layers are taken.
        seed: the plugin's seed (else the surgery's).
        use_rand: random dst position per cell; False uses position 0.
        make_processor: ``make_processor(inner, context=, block_input=, seed=)`` builds the wrapper.
        extra_roles: roles claimed besides ``tokens`` (see ``attnsurgery.surgery.ROLES``).
    """
    context = surgery.context
    for layer in surgery.model.select(layers, kinds=("self",)):
        block_input = BlockInput()
        block = _block_of(surgery, layer)
        if block is not None:
            surgery.add_hook(block, block_input.hook, pre=True, with_kwargs=True)

        processor = make_processor(
            layer.module.processor,
            context=context,
            block_input=block_input,
            seed=layer_seed(surgery, plugin, layer.path, seed) if use_rand else None,
        )
        surgery.set_processor(layer, processor, role="tokens")
        for role in extra_roles:
            surgery.claim(layer.path, role)


@dataclass(frozen=True)
class TokenMerging(Plugin):
    """ToMe for SD: merge similar tokens before self-attention and copy the results back after it.

    On U-Nets, around each selected layer, ``x = unmerge(attn(merge(norm(x)))) + x``, with the matching
    computed on the block input. Equals the ``tomesd`` package given the same dst choice, but wraps the
    model's own attention processor and works on SDXL, whose ``top`` group is its 64x64 level (at 1024 px).

    On DiTs (SD3/3.5, FLUX.1/.2, Qwen-Image, Z-Image, Chroma) the merge happens inside each layer's joint
    attention call, after RoPE, on the image tokens only (``processors.joint_merge``): text tokens are never
    merged and every query keeps every text key. ``mode="qkv"`` merges the image queries too and copies their
    outputs back (ToMe); ``mode="kv"`` merges only keys and values (cheaper, no unmerge).

    Args:
        ratio: fraction of tokens merged away (``r = floor(N * ratio)``, capped at the src count).
        sx: dst cell width in tokens.
        sy: dst cell height in tokens. A layer whose token grid holds no full ``sy x sx`` cell runs
            unmerged; when that is every selected layer at a call's size, a ``UserWarning`` says so at that
            call (not at apply: the grid depends on the image size, and the same cell fits at larger ones).
        layers: layer selector; self-attention layers only. Default (None): the highest-resolution level on
            U-Nets, every image-attending layer on DiTs.
        use_rand: random dst position per cell (position 0 for odd batches); False always position 0.
        seed: seed of the private generator (else the surgery's seed).
        mode: "qkv" (ToMe: merge, attend, unmerge) or "kv" (DiTs only: merge the image keys and values).

    Example (the 1024 px image is not generated when the examples run as tests: minutes on a CPU):
        >>> handle = attnsurgery.apply(pipe, attnsurgery.TokenMerging(ratio=0.5))
        >>> image = pipe("a castle", height=1024, width=1024).images[0]  # doctest: +SKIP
        >>> handle.remove()
    """

    ratio: float = 0.5
    sx: int = 2
    sy: int = 2
    layers: LayerSelector | None = None
    use_rand: bool = True
    seed: int | None = None
    mode: str = "qkv"

    def __post_init__(self) -> None:
        check_fraction("TokenMerging", "ratio", self.ratio)
        check_cells("TokenMerging", self.sx, self.sy)
        if self.layers is not None:
            normalize_layers(self, self.layers)
        if self.mode not in MERGE_MODES:
            raise ValueError(f"TokenMerging mode={self.mode!r} is invalid; use one of {MERGE_MODES}")

    def attach(self, surgery: Surgery) -> None:
        unet = surgery.model.family.kind == "unet"
        if unet and self.mode == "kv":
            raise ValueError(
                "TokenMerging mode='kv' merges keys inside a DiT's joint attention; on a U-Net use mode='qkv' "
                "(ToMe for SD)"
            )

        def make_processor(inner: Any, **machinery: Any) -> TokenMergeProcessor | JointMergeProcessor:
            if unet:
                return TokenMergeProcessor(inner, ratio=self.ratio, sx=self.sx, sy=self.sy, **machinery)
            return JointMergeProcessor(inner, ratio=self.ratio, sx=self.sx, sy=self.sy, mode=self.mode, **machinery)

        if unet:
            selector = "top" if self.layers is None else self.layers
            install_merging(surgery, self, selector, self.seed, self.use_rand, make_processor)
            layers = surgery.model.select(selector, kinds=("self",))
        else:
            selector = "all" if self.layers is None else self.layers
            layers = install_joint_processors(surgery, self, selector, self.seed, self.use_rand, make_processor)
        if self.ratio > 0:
            surgery.add_hook(surgery.denoiser, _no_merge_warning(self, surgery, layers), pre=True, with_kwargs=True)


def _no_merge_warning(plugin: TokenMerging, surgery: Surgery, layers: list[AttentionLayer]) -> Callable[..., None]:
    """A denoiser pre-hook (after the step clock) that warns when no selected layer's grid fits one cell:
    the plugin would silently do nothing at this image size."""
    context = surgery.context

    def warn_if_nothing_merges(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if context.latent_hw is None:
            return
        grids = [surgery.model.token_grid(layer, context.latent_hw) for layer in layers]
        if any(h >= plugin.sy and w >= plugin.sx for h, w in grids):
            return
        rows, cols = max(grids, key=lambda grid: grid[0] * grid[1])
        height, width = context.image_hw
        warnings.warn(
            f"TokenMerging merges nothing at {height}x{width} px: its {plugin.sx}x{plugin.sy} (sx x sy) cell does "
            f"not fit any selected layer's token grid (the largest is {rows}x{cols}); use smaller sx/sy (ToMe's "
            "default is 2x2), layers with larger grids, or a larger image",
            stacklevel=2,
        )

    return warn_if_nothing_merges
