"""ConvFusion: replace every self-attention (attn1) of a UNet with a distilled pyramid conv block.

Source: "Can We Achieve Efficient Diffusion without Self-Attention? Distilling Self-Attention into
Convolutions" (ICCV 2025, arXiv 2504.21292). The transformer block keeps its norm, residual, cross-attention
and feed-forward; only ``attn1`` is swapped for a ``ConvFusionAttention`` module on the surgery handle, so
``remove()`` puts the original attention modules back.

LoRAs that target attn1 (``to_q``/``to_k``/``to_v``/``to_out``) no longer apply to replaced layers. While the
blocks are in, the diffusers calls that change the modules they find in the denoiser (LoRA loading, weights,
fusing and unloading; ``enable_layerwise_casting``; ``enable_group_offload``) are refused: they cannot find the
attention modules set aside, so a load would drop their LoRA weights and the others would leave those modules
as they were, to come back so at ``remove()``. ``.to()`` and ``.half()`` do reach them.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..ops.pyramid_conv import GATES, Gate, PyramidConvBlock, kernel_preset
from ..plugins.base import Plugin
from ..surgery import resolve_target
from .format import architecture_fingerprint, check_fingerprint, load_blocks, save_blocks

if TYPE_CHECKING:
    from ..inventory import AttentionLayer
    from ..surgery import Surgery

_LEVEL = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")
# diffusers calls that change the modules they find in the denoiser (LoRA: PeftAdapterMixin, which the
# pipelines' LoRA methods call; casting; offloading): they cannot find the attention modules ConvFusion set aside
_BLIND_TO_SET_ASIDE = (
    "load_lora_adapter",
    "add_adapter",
    "set_adapters",
    "set_adapter",
    "enable_adapters",
    "disable_adapters",
    "enable_lora",
    "disable_lora",
    "fuse_lora",
    "unfuse_lora",
    "unload_lora",
    "delete_adapters",
    "enable_layerwise_casting",
    "enable_group_offload",
)


class ConvFusionAttention(nn.Module):
    """Stands in for a transformer block's ``attn1``: same call, conv maths.

    It accepts the call diffusers makes on ``attn1`` (``hidden_states`` plus ``encoder_hidden_states``,
    ``attention_mask`` and cross-attention kwargs, which a convolution has no use for and ignores) and
    reads the token grid (h, w) from the surgery's step context.

    Args:
        block: the pyramid conv block.
        grid_for: maps a token count to the (h, w) grid it lies on at the current call.
        replaced: the attention module set aside (not a submodule: its weights are not ours), which
            ``.to()``, ``.half()`` and the like move and cast along, so that ``remove()`` puts back a module
            that matches the model.
    """

    def __init__(
        self,
        block: PyramidConvBlock,
        grid_for: Callable[[int], tuple[int, int]],
        replaced: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.block = block
        self._grid_for = grid_for
        self.__dict__["_replaced"] = replaced  # bypasses nn.Module's registration of submodules

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> ConvFusionAttention:
        """``.to()``, ``.half()``, ``.cuda()`` reach the module set aside too."""
        if recurse and self._replaced is not None:
            self._replaced._apply(fn)
        return super()._apply(fn, recurse)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **cross_attention_kwargs: Any,
    ) -> torch.Tensor:
        """hidden_states [B, N, C] -> [B, N, C]."""
        if encoder_hidden_states is not None:
            raise ValueError(
                "ConvFusion replaces self-attention only, but this attn1 was called with "
                "encoder_hidden_states (an only_cross_attention model). Leave this layer out of `layers`."
            )
        dtype = self._follow(hidden_states)
        out = self.block(hidden_states.to(dtype), self._grid_for(hidden_states.shape[1]))
        return out.to(hidden_states.dtype)

    def _follow(self, hidden_states: torch.Tensor) -> torch.dtype:
        """Put the block on this call's device; returns the dtype to compute in, the block's own.

        Blocks may be kept in float32 inside a half-precision model (training): they compute in their dtype.
        Blocks left on the offload device move to the input's: ``enable_group_offload`` at leaf level onloads
        only the modules it sees called, and the block reads ``conv_out``'s weights without calling it.
        """
        device = hidden_states.device
        if any(p.device != device for p in self.block.parameters()):
            self.block.to(device=device)
        return self.block.conv_up.weight.dtype


def _kernel_sizes(paths: list[str], family: str, override: int | None) -> dict[str, int]:
    """Kernel size per attn1 path: ``override`` everywhere, else the family preset, whose entries go to the
    attention-carrying down blocks, the mid block and the up blocks in the order the UNet lists them."""
    if override is not None:
        return dict.fromkeys(paths, override)
    preset = kernel_preset(family)
    groups: dict[str, list[int]] = {"down": [], "mid": [], "up": []}
    placed: list[tuple[str, str, int]] = []
    for path in paths:
        match = _LEVEL.match(path)
        if match is None:
            raise NotImplementedError(f"{path} lies outside the UNet's down/mid/up blocks; pass kernel_size.")
        group = {"down_blocks": "down", "up_blocks": "up", None: "mid"}[match.group(1)]
        index = int(match.group(2)) if match.group(2) is not None else 0
        if index not in groups[group]:
            groups[group].append(index)
        placed.append((path, group, index))
    for group, indices in groups.items():
        if indices and len(indices) != len(preset[group]):
            raise NotImplementedError(
                f"The {family} preset has {len(preset[group])} {group} kernel sizes {preset[group]}, but "
                f"this model has {len(indices)} {group} blocks with attention; pass kernel_size instead."
            )
    return {path: preset[group][sorted(groups[group]).index(index)] for path, group, index in placed}


def _has_lora(module: nn.Module) -> bool:
    return any(hasattr(child, "lora_A") for child in module.modules())


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``module`` computes in: its weight's, unless diffusers' layerwise casting stores that weight
    in another dtype (float8) and casts it for every call."""
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook("layerwise_casting") if registry is not None else None
    return hook.compute_dtype if hook is not None else module.weight.dtype


def _refuse_while_applied(name: str) -> Callable[..., None]:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"{name}() is refused while ConvFusion replaces the attn1 layers: it changes the modules it finds in "
            "the denoiser, but not the attention modules ConvFusion set aside, which would come back unchanged "
            "at remove() (a LoRA loaded now would lose its attn1 weights for good). Call handle.remove() first, "
            f"then {name}(), then apply ConvFusion again."
        )

    refuse.__name__ = f"refuse_{name}"
    return refuse


@dataclass(frozen=True)
class ConvFusion(Plugin):
    """Swap self-attention (attn1) for distilled pyramid conv blocks (Delta-ConvFusion).

    With ``blocks`` (e.g. from :meth:`from_pretrained`) those blocks replace the attn1 layers they name;
    without, fresh blocks are built for the selected layers (the start of a distillation, see
    ``attnsurgery.distill``), with the family's kernel-size preset unless ``kernel_size`` is given.
    Blocks are moved to the replaced layer's device and compute dtype when attached, and follow it to the
    device of every call (group offload). LoRAs on a replaced attn1 stop applying (a warning names the
    layers); LoRA, layerwise-casting and group-offload calls on the denoiser are refused until ``remove()``.

    Args:
        blocks: attn1 module path -> block, or None for fresh blocks.
        fingerprint: architecture the blocks were made for (``architecture_fingerprint``); checked at
            attach when given.
        source: folder the blocks were loaded from (kept so ``to_dict`` round-trips).
        layers: layer selector for fresh blocks (self-attention layers only), default every one.
        kernel_size: one kernel size for every fresh block instead of the family preset.
        gate: gate of fresh blocks: ``"mul"`` (released code), ``"div"`` (paper text), ``"sigmoid"``.
        seed: seed of the fresh blocks' init (a private generator per layer).

    Example:
        >>> handle = attnsurgery.apply(pipe, attnsurgery.ConvFusion.from_pretrained("convfusion-sd15"))
        >>> image = pipe("a lighthouse at dawn").images[0]
        >>> handle.remove()
    """

    blocks: Mapping[str, PyramidConvBlock] | None = field(default=None, compare=False, repr=False)
    fingerprint: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    source: str | None = None
    layers: str | tuple[str, ...] = "all"
    kernel_size: int | None = None
    gate: Gate = "mul"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kernel_size is not None and (self.kernel_size < 1 or self.kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be a positive odd number or None, got {self.kernel_size}.")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}.")
        if self.blocks is not None and not self.blocks:
            raise ValueError("blocks is empty; pass at least one block, or None to build fresh ones.")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ConvFusion:
        """Load blocks saved by :meth:`save` (or by ``attnsurgery distill``) from a folder.

        Args:
            path: folder holding ``convfusion.json`` and ``convfusion.safetensors``.

        Example:
            >>> plugin = ConvFusion.from_pretrained("out/convfusion")  # doctest: +SKIP
        """
        blocks, fingerprint = load_blocks(path)
        return cls(blocks=blocks, fingerprint=fingerprint, source=str(path))

    @classmethod
    def extract(cls, target: Any) -> ConvFusion:
        """The ConvFusion blocks currently in ``target`` (pipeline or denoiser), e.g. after training.

        Example:
            >>> ConvFusion.extract(pipe).save("out/convfusion")  # doctest: +SKIP
        """
        _, denoiser = resolve_target(target)
        blocks = {
            path: module.block for path, module in denoiser.named_modules() if isinstance(module, ConvFusionAttention)
        }
        if not blocks:
            raise ValueError(f"{type(denoiser).__name__} holds no ConvFusion blocks; apply ConvFusion first.")
        return cls(blocks=blocks, fingerprint=architecture_fingerprint(denoiser))

    def save(self, folder: str | Path) -> Path:
        """Write the blocks (weights only) and their config into ``folder``."""
        if self.blocks is None or self.fingerprint is None:
            raise ValueError(
                "Only a ConvFusion holding blocks can be saved: use ConvFusion.extract(pipe) "
                "after applying and training, or ConvFusion.from_pretrained(path)."
            )
        return save_blocks(folder, self.blocks, self.fingerprint)

    def to_dict(self) -> dict[str, Any]:
        """Config without weights; blocks round-trip through ``source`` (the folder they came from)."""
        if self.blocks is not None and self.source is None:
            raise ValueError(
                "These ConvFusion blocks live only in memory; save() them and load them with "
                "ConvFusion.from_pretrained(folder) to get a serialisable config."
            )
        data = super().to_dict()
        del data["blocks"], data["fingerprint"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConvFusion:
        """Inverse of :meth:`to_dict` (loads the blocks again from ``source``)."""
        data = {key: value for key, value in data.items() if key != "type"}
        if isinstance(data.get("layers"), list):
            data["layers"] = tuple(data["layers"])
        plugin = super().from_dict(data)
        if plugin.source is None:
            return plugin
        loaded = cls.from_pretrained(plugin.source)
        return dataclasses.replace(plugin, blocks=loaded.blocks, fingerprint=loaded.fingerprint)

    def _fresh_blocks(self, surgery: Surgery, layers: Mapping[str, AttentionLayer]) -> dict[str, PyramidConvBlock]:
        paths = [layer.path for layer in surgery.model.select(self.layers, kinds=("self",))]
        kernels = _kernel_sizes(paths, surgery.model.family.name, self.kernel_size)
        return {
            path: PyramidConvBlock(
                layers[path].module.to_q.in_features,
                kernel,
                gate=self.gate,
                generator=surgery.generator("convfusion", path, seed=self.seed),
            )
            for path, kernel in kernels.items()
        }

    def attach(self, surgery: Surgery) -> None:
        if surgery.model.family.kind != "unet":
            raise NotImplementedError(
                "ConvFusion replaces the self-attention of UNet transformer blocks; "
                f"{surgery.model.family.name} is a DiT whose joint attention also mixes text tokens."
            )
        if self.fingerprint is not None:
            origin = f"ConvFusion from {self.source or 'memory'}"
            check_fingerprint(self.fingerprint, architecture_fingerprint(surgery.denoiser), origin)
        layers = {layer.path: layer for layer in surgery.model.layers if layer.kind == "self"}
        blocks = dict(self.blocks) if self.blocks is not None else self._fresh_blocks(surgery, layers)
        for path, block in blocks.items():
            if path not in layers:
                shown = ", ".join(list(layers)[:4])
                raise ValueError(
                    f"{path} is not a self-attention layer of this model (it has {shown}, ...); "
                    "these blocks were made for another architecture."
                )
            width = layers[path].module.to_q.in_features
            if width != block.channels:
                raise ValueError(
                    f"The block for {path} has {block.channels} channels, the layer {width}; "
                    "these blocks were made for another architecture."
                )
        with_lora = [path for path in blocks if _has_lora(layers[path].module)]
        if with_lora:
            warnings.warn(
                f"LoRA weights on {len(with_lora)} attn1 layers no longer apply once ConvFusion "
                f"replaces them (e.g. {with_lora[0]}); they apply again after remove().",
                stacklevel=3,
            )
        for path, block in blocks.items():
            to_q = layers[path].module.to_q
            to_q = getattr(to_q, "base_layer", to_q)  # a peft LoRA wrapper keeps the real projection here
            block.to(device=to_q.weight.device, dtype=_compute_dtype(to_q))
            replacement = ConvFusionAttention(block, surgery.context.grid_for, replaced=layers[path].module)
            surgery.swap_module(path, replacement, role="module")
        for name in _BLIND_TO_SET_ASIDE:
            if hasattr(surgery.denoiser, name):
                surgery.set_attr(surgery.denoiser, name, _refuse_while_applied(name))
