"""RAU-Net (HiDiffusion) as forward hooks on a diffusers U-Net; nothing in the model is replaced.

- RAD: a pre-hook on the chosen downsampler (the `Downsample2D`, not its conv) feeds it every second row
  and column. A 3x3 stride-2 padding-1 conv on `x[..., ::2, ::2]` equals the same weights run with stride 4,
  padding 2, dilation 2 on `x` (HiDiffusion's RAD). Hooking the downsampler, whose identity LoRA loading
  and unloading never change, keeps RAD on when peft wraps or unwraps the conv, and its LoRA branch
  (a conv of the same kernel, stride and padding) sees the same subsampled input.
- RAU: pre-hooks hand every upsampler the size of the skip it must meet (the input size of the
  matching downsampler), which also makes odd and non-square sizes line up.
- CA pool/unpool: a hook after the first attention of a down block average-pools its output; a hook
  after the second attention of the mirrored up block resizes back to the pre-pool size.
- ControlNet residuals are resized (bicubic) to the sizes the down path will have this call, and so are
  T2I-Adapter residuals (``down_intrablock_additional_residuals``), which the U-Net adds inside its down
  blocks: after the last pair of a cross-attention block, after the whole block otherwise, then one more
  at the mid block when its shape matches there.

Sizes recorded during a call live in `RauNetHooks.call`, reset when the next denoiser call starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..ops.raunet import DownBlockShape, down_path_sizes, pool_features, resize_features

__all__ = ["RauNetHooks", "RauNetLayout", "RauNetPhase"]

Size = tuple[int, int]


@dataclass(frozen=True)
class RauNetLayout:
    """Where RAU-Net acts in one U-Net (indices into `down_blocks` / `up_blocks`).

    Args:
        num_blocks: Number of down (and up) blocks.
        rad_block: Down block whose downsampler runs RAD; the mirrored up block's upsampler is the RAU.
        pool_block: Down block pooled after its first pair; the mirrored up block unpools after its second.
    """

    num_blocks: int
    rad_block: int
    pool_block: int

    @property
    def rau_block(self) -> int:
        """Up block whose upsampler meets the skip saved just before the RAD block's downsampler."""
        return self.num_blocks - 2 - self.rad_block

    @property
    def unpool_block(self) -> int:
        """Up block at the pooled block's resolution."""
        return self.num_blocks - 1 - self.pool_block


@dataclass(frozen=True)
class RauNetPhase:
    """What RAU-Net does during one denoiser call."""

    engaged: bool = False
    rad: bool = False
    pool: bool = False


PhaseFn = Callable[[bool], RauNetPhase]
"""Given whether the call carries ControlNet residuals, the phase of the current call."""


@dataclass
class _CallState:
    phase: RauNetPhase = field(default_factory=RauNetPhase)
    downsampler_inputs: dict[int, Size] = field(default_factory=dict)
    pre_pool: Size | None = None


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def _replace_first_tensor(output: Any, tensor: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    output.sample = tensor
    return output


def _down_block_shapes(unet: torch.nn.Module) -> list[DownBlockShape]:
    shapes = []
    for block in unet.down_blocks:
        downsample = None
        if getattr(block, "downsamplers", None):
            conv = block.downsamplers[0].conv
            conv = getattr(conv, "base_layer", conv)  # a PEFT LoRA wrapper keeps the real conv here
            downsample = (conv.kernel_size[0], conv.stride[0], conv.padding[0])
        shapes.append(DownBlockShape(len(block.resnets), downsample))
    return shapes


class RauNetHooks:
    """The hook functions of one RAU-Net attachment; `attach` registers them through a surgery.

    Args:
        unet: The U-Net (its blocks are read, never changed).
        layout: Where RAD/RAU and pool/unpool act.
        phase: Called once per denoiser call to decide what is active.
    """

    def __init__(self, unet: torch.nn.Module, layout: RauNetLayout, phase: PhaseFn) -> None:
        self.unet = unet
        self.layout = layout
        self.phase = phase
        self.call = _CallState()
        self._block_shapes = _down_block_shapes(unet)
        self._adds_before_downsampler = [bool(getattr(b, "has_cross_attention", False)) for b in unet.down_blocks]

    def attach(self, surgery: Any) -> None:
        """Register every hook through `surgery.add_hook`, so `remove()` takes them all away."""
        unet, layout = self.unet, self.layout
        surgery.add_hook(unet, self.begin_call, pre=True, with_kwargs=True)
        for index, block in enumerate(unet.down_blocks):
            if getattr(block, "downsamplers", None):
                surgery.add_hook(block.downsamplers[0], self._record_downsampler_input(index), pre=True)
        count = len(unet.down_blocks)
        for index, block in enumerate(unet.up_blocks):
            if getattr(block, "upsamplers", None):
                skip_of = count - 2 - index
                surgery.add_hook(
                    block.upsamplers[0], self._skip_size_for_upsampler(skip_of), pre=True, with_kwargs=True
                )
        # after the recording hook on the same downsampler, which must see the full-size input
        surgery.add_hook(unet.down_blocks[layout.rad_block].downsamplers[0], self.rad, pre=True)
        surgery.add_hook(unet.down_blocks[layout.pool_block].attentions[0], self.pool, pre=False)
        surgery.add_hook(unet.up_blocks[layout.unpool_block].attentions[1], self.unpool, pre=False)

    # -- per call -----------------------------------------------------------------------------------
    def begin_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Decide this call's phase; fit ControlNet and T2I-Adapter residuals to the sizes RAU-Net will produce."""
        down = kwargs.get("down_block_additional_residuals")
        mid = kwargs.get("mid_block_additional_residual")
        intrablock = kwargs.get("down_intrablock_additional_residuals")
        controlnet = down is not None and mid is not None
        self.call = _CallState(phase=self.phase(controlnet))
        if not (controlnet or intrablock) or not (self.call.phase.rad or self.call.phase.pool):
            return None
        sample = args[0] if args else kwargs["sample"]
        latent = tuple(sample.shape[-2:])
        skips, mid_size = down_path_sizes(
            latent,
            self._block_shapes,
            rad_blocks=frozenset({self.layout.rad_block} if self.call.phase.rad else ()),
            pooled_blocks=frozenset({self.layout.pool_block} if self.call.phase.pool else ()),
        )
        kwargs = dict(kwargs)
        if controlnet:
            if len(skips) != len(down):
                raise ValueError(
                    f"ControlNet gave {len(down)} down-block residuals but this U-Net saves {len(skips)} skips; "
                    "the ControlNet does not match the U-Net."
                )
            kwargs["down_block_additional_residuals"] = tuple(resize_features(r, s) for r, s in zip(down, skips))
            kwargs["mid_block_additional_residual"] = resize_features(mid, mid_size)
        if intrablock:
            native = self._intrablock_sizes(*down_path_sizes(latent, self._block_shapes))
            patched = self._intrablock_sizes(skips, mid_size)
            kwargs["down_intrablock_additional_residuals"] = [
                resize_features(r, new) if tuple(r.shape[-2:]) == old else r
                for r, old, new in zip(intrablock, native, patched)
            ] + list(intrablock[len(native) :])
        return args, kwargs

    def _intrablock_sizes(self, skips: list[Size], mid_size: Size) -> list[Size]:
        """Where the U-Net adds T2I-Adapter residuals, in order: each down block, then the mid block."""
        sizes, index = [], 1  # skips[0] is conv_in's
        for block, before in zip(self._block_shapes, self._adds_before_downsampler):
            index += block.num_layers
            last_pair = skips[index - 1]
            if block.downsample is not None:
                index += 1
            sizes.append(last_pair if before else skips[index - 1])
        return [*sizes, mid_size]

    def _record_downsampler_input(self, index: int) -> Callable[..., None]:
        def record(module: torch.nn.Module, args: tuple) -> None:
            if self.call.phase.engaged:
                self.call.downsampler_inputs[index] = tuple(args[0].shape[-2:])

        return record

    def _skip_size_for_upsampler(self, skip_of: int) -> Callable[..., tuple[tuple, dict] | None]:
        def give_size(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            size = self.call.downsampler_inputs.get(skip_of)
            if size is None:
                return None
            if len(args) >= 2:
                return (args[0], size, *args[2:]), kwargs
            return args, {**kwargs, "output_size": size}

        return give_size

    def rad(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        """RAD: the stride-2 conv on every second pixel == stride 4, dilation 2 on all of them."""
        if not self.call.phase.rad:
            return None
        return (args[0][..., ::2, ::2], *args[1:])

    def pool(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        """After the block's first (resnet, attention) pair: 2x2 average pool, ceil mode."""
        if not self.call.phase.pool:
            return None
        features = _first_tensor(output)
        self.call.pre_pool = tuple(features.shape[-2:])
        return _replace_first_tensor(output, pool_features(features))

    def unpool(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        """After the mirrored block's second pair: bicubic back to the size before pooling."""
        if self.call.pre_pool is None:
            return None
        size, self.call.pre_pool = self.call.pre_pool, None
        return _replace_first_tensor(output, resize_features(_first_tensor(output), size))
