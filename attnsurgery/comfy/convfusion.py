"""ConvFusion (Delta-ConvFusion): distilled conv blocks loaded onto a ComfyUI U-Net in place of self-attention.

Design. A block replaces a transformer block's attn1 and needs the (h, w) token grid of each call; for a
non-square latent the token count alone does not give it. ComfyUI calls attn1 as ``attn1(n, context=...,
value=...)`` without ``transformer_options``, so the grid has to reach the module some other way:

- Chosen: an object patch swaps each attn1 for the library's own
  :class:`~attnsurgery.convfusion.ConvFusionAttention` (the module the diffusers plugin swaps in, so
  the maths is the same by construction), and a U-Net wrapper (:func:`~.patching.wrap_unet`: keyed where
  ComfyUI has keyed wrappers) puts the latent shape of each U-Net call into a context variable for the
  duration of that call only, innermost, so it sees the tensor that reaches the U-Net. Each layer turns the
  shape into its grid by its resolution level and checks it against the tokens it got. Nothing per call is
  kept on the node or the module.
- Not an attn1 replace patch: ComfyUI applies ``attn1.to_q/to_k/to_v`` before it and ``attn1.to_out``
  after it, so the block's input (the normed tokens) is lost in the projections. It works only with
  identity stand-ins for the four projections, and then another node's replace patch on the same layer
  (one slot per layer, e.g. perturbed-attention guidance) would silently run attention on unprojected tokens.
- Not an attn1 patch plus output patch: attention would still run in full, the very cost ConvFusion
  removes, only for its result to be thrown away.

Guards: token-changing nodes (token merging, windows, agents) and ConvFusion refuse to share a layer at
patch time; a replace patch that reaches a ConvFusion layer at sampling time (PAG, SAG) is refused by the
wrapper; a single-slot wrapper set by an earlier node is chained. Keys and values that other attn1 patches hand over
are ignored: a conv block has none. LoRAs on attn1 do not apply to replaced layers, and keep their keys for
the other clones of the model (:class:`KeyedConvFusionAttention`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..convfusion.format import CONFIG_NAME, WEIGHTS_NAME, check_fingerprint, load_blocks
from ..convfusion.plugin import ConvFusionAttention
from ..inventory import level_grid
from ..ops.pyramid_conv import PyramidConvBlock
from .node import ModelPatchNode
from .patching import DIT_LIMITATION, AttentionSite, UnetCall, claim_token_layers, unet_attention_sites, wrap_unet

__all__ = ["AttnSurgeryConvFusion", "blocks_folder", "comfy_fingerprint", "place_blocks"]

logger = logging.getLogger(__name__)

LATENT_SHAPE: ContextVar[tuple[int, ...] | None] = ContextVar("attnsurgery_convfusion_latent", default=None)


def blocks_folder(path: str) -> Path:
    """The ConvFusion folder a node input names: the folder itself or one of its two files.

    Raises:
        ValueError: the input is empty.
    """
    text = path.strip().strip('"')
    if not text:
        raise ValueError(
            f"No path given: name the folder that ConvFusion.save or `attnsurgery distill` wrote "
            f"(it holds {CONFIG_NAME} and {WEIGHTS_NAME})."
        )
    folder = Path(text).expanduser()
    return folder.parent if folder.is_file() else folder


def comfy_fingerprint(model: Any) -> dict[str, Any]:
    """The part of :func:`~attnsurgery.convfusion.format.architecture_fingerprint` that a ComfyUI U-Net
    config determines, under diffusers' key names."""
    config = model.model.model_config.unet_config
    return {
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "block_out_channels": [config["model_channels"] * mult for mult in config["channel_mult"]],
        "cross_attention_dim": config.get("context_dim"),
        "use_linear_projection": bool(config.get("use_linear_in_transformer", False)),
    }


def place_blocks(
    model: Any, sites: list[AttentionSite], blocks: dict[str, PyramidConvBlock], source: str
) -> dict[AttentionSite, PyramidConvBlock]:
    """Match blocks (keyed by diffusers attn1 path) to the model's self-attention sites.

    Raises:
        ValueError: a block names a layer the model lacks or has another width (the message lists the
            model's layers and widths).
        NotImplementedError: a layer's attn1 attends to the text (``disable_self_attn``).
    """
    by_path = {site.path: site for site in sites}
    # Read the transformer blocks, not attn1: a loaded clone's object patches replace attn1 in place.
    transformers = {site.path: model.model.get_submodule(site.module.rsplit(".", 1)[0]) for site in sites}
    widths = {path: transformer.norm1.normalized_shape[0] for path, transformer in transformers.items()}
    expected = ", ".join(f"{path} ({width} channels)" for path, width in widths.items())
    unknown = [path for path in blocks if path not in by_path]
    wrong = [
        f"{path} has {block.channels} channels, the model {widths[path]}"
        for path, block in blocks.items()
        if path in widths and widths[path] != block.channels
    ]
    if unknown or wrong:
        found = f"blocks for layers this model lacks ({', '.join(unknown)})" if unknown else "; ".join(wrong)
        raise ValueError(
            f"{source} does not fit this model: {found}. The model's self-attention layers are "
            f"{expected}. Load blocks distilled for this architecture."
        )
    for path in blocks:
        if transformers[path].disable_self_attn:
            raise NotImplementedError(
                f"{path} attends to the text in attn1 (disable_self_attn); ConvFusion replaces self-attention only."
            )
    return {by_path[path]: block for path, block in blocks.items()}


class KeyedConvFusionAttention(ConvFusionAttention):
    """:class:`~attnsurgery.convfusion.ConvFusionAttention` that also holds the submodules of the attn1 it
    replaces (the very modules, no copy), so the U-Net keeps their state-dict keys while it is swapped in.

    ComfyUI leaves a loaded clone's object patches in the shared U-Net between runs, and 0.20.1 accepts
    weight patches (a LoRA) only for keys the U-Net has at that moment: without the projections here, a LoRA
    loaded into another clone of the model meanwhile would lose its attn1 keys without an error. They are
    never called here; a weight patch on them acts once the original attn1 is back.

    Raises:
        NotImplementedError: the replaced module has a submodule named like one of the block's.
    """

    def __init__(
        self, block: PyramidConvBlock, grid_for: Callable[[int], tuple[int, int]], kept: dict[str, nn.Module]
    ) -> None:
        super().__init__(block, grid_for)
        clash = sorted(set(kept) & set(self._modules))
        if clash:
            raise NotImplementedError(f"the attn1 to replace has submodules named like ConvFusion's own: {clash}")
        for name, child in kept.items():
            self.add_module(name, child)
        self.kept = tuple(kept)


def replaced_submodules(model: Any, path: str) -> dict[str, nn.Module]:
    """The submodules of the attn1 at ``path`` (of ``model.model``) that a ConvFusion block keeps.

    A clone that ComfyUI left loaded may hold its block there (its object patches stay in the shared U-Net);
    the block then hands over the original's submodules it keeps.
    """
    module = model.model.get_submodule(path)
    if isinstance(module, KeyedConvFusionAttention):
        return {name: getattr(module, name) for name in module.kept}
    return dict(module.named_children())


def grid_at_level(path: str, level: int) -> Callable[[int], tuple[int, int]]:
    """A layer's ``grid_for``: its token grid in the latent of the U-Net call under way."""

    def grid_for(num_tokens: int) -> tuple[int, int]:
        shape = LATENT_SHAPE.get()
        if shape is None:
            raise RuntimeError(
                f"ConvFusion at {path} ran outside its U-Net wrapper: a node applied after "
                "ConvFusion replaced the model's U-Net function wrapper (this ComfyUI has one slot). "
                "Apply ConvFusion after it."
            )
        height, width = level_grid((shape[-2], shape[-1]), level)
        if height * width != num_tokens:
            raise ValueError(
                f"ConvFusion at {path} expects the {height}x{width} token grid of a {shape[-2]}x"
                f"{shape[-1]} latent, got {num_tokens} tokens: another patch changed this layer's "
                "tokens (e.g. HyperTile); keep it off the ConvFusion layers."
            )
        return height, width

    return grid_for


def refuse_replace_patches(transformer_options: dict, sites: Iterable[AttentionSite]) -> None:
    """Raise when an attn1 replace patch of this call reaches a layer that has no attention any more."""
    replace = transformer_options.get("patches_replace", {}).get("attn1", {})
    hit = [site.path for site in sites if site.key in replace or site.block in replace]
    if hit:
        raise ValueError(
            f"An attn1 replace patch (e.g. perturbed-attention or self-attention guidance) targets "
            f"{', '.join(hit)}, where ConvFusion put a conv block: there is no attention to patch. "
            "Point that node at other layers."
        )


def scope_latent_shape(sites: list[AttentionSite]):
    """Around each U-Net call (:func:`~.patching.wrap_unet`): the latent shape in ``LATENT_SHAPE`` while the
    U-Net runs, then reset; replace patches on ConvFusion layers are refused first."""

    def around(call: UnetCall, x: torch.Tensor, options: dict, control: Any) -> torch.Tensor:
        refuse_replace_patches(options, sites)  # as the wrappers outside left them
        token = LATENT_SHAPE.set(tuple(x.shape))
        try:
            return call(x, options, control)
        finally:
            LATENT_SHAPE.reset(token)

    return around


class AttnSurgeryConvFusion(ModelPatchNode):
    """Distilled ConvFusion blocks in place of the U-Net self-attention layers they were trained for."""

    DESCRIPTION = (
        "ConvFusion: replaces self-attention with distilled pyramid depthwise-conv blocks (linear in the "
        "token count), loaded from a folder written by ConvFusion.save or `attnsurgery distill`. Layers "
        "without a block keep their attention; LoRAs on replaced layers no longer apply. " + DIT_LIMITATION
    )

    @classmethod
    def inputs(cls) -> dict[str, Any]:
        return {
            "path": (
                "STRING",
                {"default": "", "tooltip": f"Folder with {CONFIG_NAME} and {WEIGHTS_NAME} (or one of those files)."},
            ),
        }

    def patch(self, model: Any, path: str) -> tuple[Any]:
        """Clone ``model``, swap the attn1 modules that have a block and scope each U-Net call's latent shape.

        Args:
            model: ComfyUI MODEL (a ModelPatcher).
            path: the saved blocks' folder, or one of its files.

        Example:
            >>> (patched,) = AttnSurgeryConvFusion().patch(model, "models/convfusion/sd15")  # doctest: +SKIP
        """
        folder = blocks_folder(path)
        sites = unet_attention_sites(model)
        blocks, fingerprint = load_blocks(folder)
        current = comfy_fingerprint(model)
        saved = {key: value for key, value in fingerprint.items() if key in current}
        check_fingerprint(saved, {key: current[key] for key in saved}, f"The ConvFusion blocks in {folder}")
        placed = place_blocks(model, sites, blocks, f"The ConvFusion blocks in {folder}")
        dtype = getattr(model.model, "manual_cast_dtype", None) or model.model.get_dtype()
        with_lora = [site.path for site in placed if any(key.startswith(site.module + ".") for key in model.patches)]
        if with_lora:
            logger.warning(
                "ConvFusion replaces %d attn1 layers that carry LoRA or other weight patches (e.g. %s); "
                "those patches no longer apply there",
                len(with_lora),
                with_lora[0],
            )
        patched = model.clone()
        claim_token_layers(patched, {site.key for site in placed}, "ConvFusion")
        for site, block in placed.items():
            block.to(dtype=dtype)  # the device follows the model when ComfyUI loads it
            replacement = KeyedConvFusionAttention(
                block, grid_at_level(site.path, site.level), replaced_submodules(model, site.module)
            )
            patched.add_object_patch(site.module, replacement)
        wrap_unet(patched, "attnsurgery_convfusion", scope_latent_shape(list(placed)))
        return (patched,)
