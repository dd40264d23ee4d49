"""Convert the released Delta-ConvFusion weights (the authors' SD1.5/SDXL files) into attnsurgery's format.

The official code (HCP-Diffusion based) replaces each transformer block's ``attn1`` by a module named
``conv1`` and saves only those modules, keyed by the denoiser's module path, e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.conv1.conv_up.weight`` (possibly behind a prefix such as
``denoiser.``). Per block, with C the width, C' = C/2 and one gate per pyramid scale (1, 1/2):

=====================================  ===================  ========================================
official parameter                     official shape       ours (``PyramidConvBlock``)
=====================================  ===================  ========================================
``conv_up.weight`` / ``.bias``         [C', C] / [C']       ``conv_up`` (same layout)
``gates.i.conv_spatial.weight``        [k, k, C'] (BHWC)    ``dw_convs.i.weight`` [C', 1, k, k]
``conv_out.weight`` / ``.bias``        [C, C'/2 * n] / [C]  ``conv_out`` (same layout)
``conv_pool.weight`` / ``.bias``       [C, C] / [C]         ``conv_pool`` (same layout)
=====================================  ===================  ========================================

The projections may also come as 1x1 convolutions ([out, in, 1, 1]) and the depthwise kernels in
PyTorch's layout ([C', 1, k, k]), as the authors' plain-PyTorch block stores them; that block has no
``conv_up`` bias, which converts exactly to a zero bias.

The maths is the same: the official gate is ``x1 * (x2 / (C'/2) ** -0.5)`` = x1 * x2 * sqrt(C/4) (our
``"mul"`` gate; their PixArt files use ``x1 * sigmoid(x2)``, our ``"sigmoid"``), pooling is adaptive
average pooling to ``floor(H s) x floor(W s)``, upsampling is bilinear without corner alignment, and the
pool branch is the grid mean through ``conv_pool``. Which gate a file was trained with is not stored in
it, so it is an argument. What a converter cannot bridge, and refuses: a bias on the depthwise convs
(the gate multiplies after it), a hidden width other than C/2, and non-square or even kernels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from ..inventory import describe
from ..ops.pyramid_conv import PyramidConvBlock
from ..surgery import resolve_target
from .format import architecture_fingerprint
from .plugin import ConvFusion

__all__ = ["OFFICIAL_GATES", "convert_official", "load_official", "official_block_keys"]

OFFICIAL_GATES: tuple[str, ...] = ("mul", "sigmoid")
OfficialGate = Literal["mul", "sigmoid"]

# <any prefix><transformer block path>.conv1.<parameter>; the block path is diffusers' own.
_KEY = re.compile(
    r"^(?P<prefix>.*?)(?P<block>(?:down_blocks\.\d+\.|up_blocks\.\d+\.|mid_block\.)attentions\.\d+\."
    r"transformer_blocks\.\d+)\.conv1\.(?P<param>.+)$"
)
_GATE_PARAM = re.compile(r"^gates\.(\d+)\.conv_spatial\.(weight|bias)$")
_PLAIN_PARAMS = (
    "conv_up.weight",
    "conv_up.bias",
    "conv_out.weight",
    "conv_out.bias",
    "conv_pool.weight",
    "conv_pool.bias",
)


def official_block_keys(block_path: str, num_scales: int = 2) -> list[str]:
    """The keys one official block is stored under (``conv_up.bias`` may be absent in the plain-PyTorch
    variant).

    Args:
        block_path: the transformer block, e.g. ``"mid_block.attentions.0.transformer_blocks.0"``.
        num_scales: number of pyramid scales (gates).

    Example:
        >>> official_block_keys("mid_block.attentions.0.transformer_blocks.0")[0]
        'mid_block.attentions.0.transformer_blocks.0.conv1.conv_up.weight'
    """
    params = [*_PLAIN_PARAMS[:2], *(f"gates.{i}.conv_spatial.weight" for i in range(num_scales)), *_PLAIN_PARAMS[2:]]
    return [f"{block_path}.conv1.{param}" for param in params]


def load_official(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official ConvFusion file (``.safetensors``, or a torch ``.pt``/``.ckpt`` of tensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such file: {path} (pass the released ConvFusion .safetensors file).")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat dict of tensors; pass the released .safetensors file.")
    return state


def _group_by_block(state: Mapping[str, torch.Tensor], skip_other_keys: bool) -> dict[str, dict[str, torch.Tensor]]:
    """{transformer block path: {parameter: tensor}}; raises on keys that are no ``conv1`` parameter unless
    ``skip_other_keys``."""
    blocks: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            unknown.append(key)
            continue
        params = blocks.setdefault(match["block"], {})
        if match["param"] in params:
            raise ValueError(
                f"Two keys name {match['block']}.conv1.{match['param']} (different prefixes); "
                "pass the weights of one model only."
            )
        params[match["param"]] = tensor
    if unknown and not skip_other_keys:
        raise ValueError(
            f"{len(unknown)} keys are no official ConvFusion block weights (e.g. {sorted(unknown)[:3]}); "
            "expected only '<...>.transformer_blocks.N.conv1.<parameter>' keys such as "
            f"{official_block_keys('down_blocks.0.attentions.0.transformer_blocks.0')[:3]}. "
            "Pass the released ConvFusion weights file; for a whole ConvFusion UNet (whose other weights "
            "are the base model's), skip the other keys (skip_other_keys=True, --skip-other-keys)."
        )
    if not blocks:
        raise ValueError("The file holds no tensors; pass the released ConvFusion weights file.")
    return blocks


def _as_matrix(tensor: torch.Tensor, key: str) -> torch.Tensor:
    """A linear weight [out, in], from either its own layout or a 1x1 convolution's [out, in, 1, 1]."""
    if tensor.dim() == 4 and tensor.shape[2:] == (1, 1):
        return tensor[:, :, 0, 0]
    if tensor.dim() != 2:
        raise ValueError(
            f"{key} has shape {list(tensor.shape)}; expected a linear weight [out, in] "
            "or a 1x1 convolution [out, in, 1, 1]."
        )
    return tensor


def _as_depthwise(tensor: torch.Tensor, key: str, hidden: int) -> torch.Tensor:
    """A depthwise kernel in PyTorch's layout [C', 1, k, k], from the Triton layout [k, k, C'] or its own."""
    if tensor.dim() == 3 and tensor.shape[2] == hidden:
        tensor = tensor.permute(2, 0, 1).unsqueeze(1)
    if tensor.dim() != 4 or tensor.shape[:2] != (hidden, 1):
        raise ValueError(
            f"{key} has shape {list(tensor.shape)}; expected a depthwise kernel over {hidden} "
            f"channels, [k, k, {hidden}] (Triton layout) or [{hidden}, 1, k, k]."
        )
    height, width = tensor.shape[2:]
    if height != width or height % 2 == 0:
        raise ValueError(
            f"{key} is a {height}x{width} kernel; only square kernels of odd size (same "
            "padding) convert to PyramidConvBlock."
        )
    return tensor


def _expect_shape(tensor: torch.Tensor, shape: tuple[int, ...], key: str, why: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{key} has shape {list(tensor.shape)}, expected {list(shape)} ({why}).")


def _check_block_keys(name: str, params: Mapping[str, torch.Tensor], num_scales: int) -> None:
    """Raise on parameters a block should not have, lacks, or that cannot be converted."""
    expected = [key.rsplit(".conv1.", 1)[1] for key in official_block_keys(name.removesuffix(".conv1"), num_scales)]
    gates = sorted(int(match[1]) for key in params if (match := _GATE_PARAM.match(key)) and match[2] == "weight")
    if any(key.startswith("gates.") and key.endswith(".conv_spatial.bias") for key in params):
        raise ValueError(
            f"{name} has a bias on its depthwise convs (gates.*.conv_spatial.bias). The released blocks have "
            "none, and PyramidConvBlock cannot hold one: the gate multiplies the two halves after the conv, "
            "so the bias cannot be folded elsewhere. This file is from a variant that cannot be converted."
        )
    unknown = sorted(key for key in params if key not in _PLAIN_PARAMS and not _GATE_PARAM.match(key))
    if unknown:
        raise ValueError(f"{name} has unexpected parameters {unknown}; a block has {expected}.")
    missing = [key for key in expected if key not in params and key != "conv_up.bias"]
    if missing:
        raise ValueError(f"{name} lacks {missing}; a block has {expected}.")
    if gates != list(range(num_scales)):
        raise ValueError(
            f"{name} has gates {gates}, but {num_scales} scales were given; the file's scales are not stored "
            "in it: pass `scales` with one entry per gate (the released files use (1, 1/2))."
        )


def _convert_block(
    block_path: str, params: Mapping[str, torch.Tensor], scales: Sequence[float], gate: OfficialGate
) -> PyramidConvBlock:
    """One official ``conv1`` -> a PyramidConvBlock holding the same function."""
    name = f"{block_path}.conv1"
    _check_block_keys(name, params, len(scales))
    up = _as_matrix(params["conv_up.weight"], f"{name}.conv_up.weight")
    hidden, channels = up.shape
    if channels % 4 or hidden != channels // 2:
        raise ValueError(
            f"{name}.conv_up maps {channels} -> {hidden} channels; PyramidConvBlock needs a width divisible by "
            "4 and a hidden width of half of it (the official inter_ratio 0.5)."
        )
    kernels = [
        _as_depthwise(params[f"gates.{i}.conv_spatial.weight"], f"{name}.gates.{i}.conv_spatial.weight", hidden)
        for i in range(len(scales))
    ]
    sizes = {kernel.shape[-1] for kernel in kernels}
    if len(sizes) != 1:
        raise ValueError(f"{name} uses kernel sizes {sorted(sizes)} across its scales; PyramidConvBlock uses one.")
    out = _as_matrix(params["conv_out.weight"], f"{name}.conv_out.weight")
    pool = _as_matrix(params["conv_pool.weight"], f"{name}.conv_pool.weight")
    up_bias = params.get("conv_up.bias", torch.zeros(hidden, dtype=up.dtype))
    _expect_shape(out, (channels, hidden // 2 * len(scales)), f"{name}.conv_out.weight", "C x C/4 per scale")
    _expect_shape(pool, (channels, channels), f"{name}.conv_pool.weight", "C x C")
    _expect_shape(up_bias, (hidden,), f"{name}.conv_up.bias", "C/2")
    for part in ("conv_out", "conv_pool"):
        _expect_shape(params[f"{part}.bias"], (channels,), f"{name}.{part}.bias", "C")
    block = PyramidConvBlock(channels, sizes.pop(), scales=scales, gate=gate, generator=torch.Generator())
    state = {
        "conv_up.weight": up,
        "conv_up.bias": up_bias,
        **{f"dw_convs.{i}.weight": kernel for i, kernel in enumerate(kernels)},
        "conv_out.weight": out,
        "conv_out.bias": params["conv_out.bias"],
        "conv_pool.weight": pool,
        "conv_pool.bias": params["conv_pool.bias"],
    }
    block.load_state_dict({key: value.float() for key, value in state.items()})
    return block


def convert_official(
    source: str | Path | Mapping[str, torch.Tensor],
    target: Any,
    gate: OfficialGate = "mul",
    scales: Sequence[float] = (1.0, 0.5),
    skip_other_keys: bool = False,
) -> ConvFusion:
    """Turn the authors' released ConvFusion weights into a :class:`ConvFusion` for ``target``'s model.

    Every ``<block>.conv1`` of the file becomes the replacement of ``<block>.attn1``; the file must cover
    exactly the model's self-attention layers, with matching widths. Weights are stored in float32.

    Args:
        source: the official ``.safetensors`` file (or ``.pt``), or its state dict.
        target: the pipeline or denoiser the weights were trained for (SD1.x/SDXL UNet; a model built on
            the meta device is enough, no weights are read).
        gate: ``"mul"`` for the released SD1.5/SDXL files (x1 * x2 * sqrt(C/4)), ``"sigmoid"`` for files
            of the sigmoid-gated variant.
        scales: the pyramid scales the file was trained with, one per gate (released: (1, 1/2)).
        skip_other_keys: ignore keys that are no ``conv1`` parameter (a whole saved ConvFusion UNet, whose
            other weights are the frozen base model's) instead of refusing the file.

    Returns:
        A ConvFusion holding the converted blocks and ``target``'s architecture fingerprint; ``save`` it
        to get a folder that :meth:`ConvFusion.from_pretrained` loads.

    Raises:
        ValueError: unknown, missing or misshapen keys, a variant that cannot be converted, or a file whose
            blocks do not match the model's layers.

    Example:
        >>> plugin = convert_official("ConvFusion-sd15.safetensors", pipe)  # doctest: +SKIP
        >>> plugin.save("convfusion-sd15")  # doctest: +SKIP
    """
    if gate not in OFFICIAL_GATES:
        raise ValueError(f"gate must be one of {OFFICIAL_GATES} (the official code has no other), got {gate!r}.")
    _, denoiser = resolve_target(target)
    info = describe(denoiser)
    if info.family.kind != "unet":
        raise NotImplementedError(
            f"The released ConvFusion weights are for SD1.x/SDXL UNets; this model is "
            f"{info.family.name} ({info.family.kind})."
        )
    state = load_official(source) if isinstance(source, (str, Path)) else dict(source)
    grouped = _group_by_block(state, skip_other_keys)
    widths = {layer.path: layer.module.to_q.in_features for layer in info.layers if layer.kind == "self"}
    by_layer = {f"{block}.attn1": params for block, params in grouped.items()}
    extra = sorted(set(by_layer) - set(widths))
    missing = sorted(set(widths) - set(by_layer))
    if extra or missing:
        expected = [official_block_keys(path.removesuffix(".attn1"), len(scales))[0] for path in missing[:2]]
        raise ValueError(
            f"The file's blocks do not match this {info.family.name} model's self-attention layers: "
            f"{len(extra)} blocks name no attn1 of the model (e.g. {extra[:3]}), and {len(missing)} of its "
            f"{len(widths)} attn1 layers have no block (e.g. {missing[:3]}; expected keys such as {expected}). "
            "Convert with the model the weights were released for (SD1.5 or SDXL)."
        )
    blocks = {}
    for path, params in by_layer.items():
        block = _convert_block(path.removesuffix(".attn1"), params, scales, gate)
        if block.channels != widths[path]:
            raise ValueError(
                f"{path.removesuffix('.attn1')}.conv1 is {block.channels} channels wide, the model's "
                f"{path} {widths[path]}; these weights are for another model."
            )
        blocks[path] = block
    ordered = {path: blocks[path] for path in widths}
    return ConvFusion(blocks=ordered, fingerprint=architecture_fingerprint(denoiser))
