"""FlexAttention over tile-ordered tokens: a BlockMask skips the key blocks no query of a block attends.

Row-major image tokens put a window's keys in many thin stripes, so nearly every block would be partly
attended. The tokens are therefore permuted into tiles first (per dilation sub-grid, tiles of
:func:`tile_for` tokens, each one mask block), text tokens last; then a block of queries is a tile, its keys are
a few tiles, and the block sparsity approaches the spec's. Blocks that are wholly attended run without the
mask function.

The permutation, lookup tables and BlockMask depend only on the spec and the device and are cached
(:func:`flex_plan`); the compiled kernel is built once per process and recompiles only for new shapes and
dtypes (``torch.compile``'s own cache). Hidden text keys (``text_key_mask``) go in through a score function
so the cached BlockMask stays batch-independent.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnsurgery.ops.neighborhood_backends.common import key_keep
from attnsurgery.ops.neighborhood_spec import NeighborhoodSpec

CPU_TILE = (8, 8)
"""Image tokens per tile (rows, cols) on CPU: blocks of 64. Ours, measured on one thread (64 x 64 grid, window
32, 4 heads x 128, 128 text tokens): 1.3x faster than 8 x 16 tiles at stride 1, 1.15x slower at stride 8. The
window starts ``16g - 24`` and ``16g - 32`` (windows 64 and 80 at stride 16) fall on 8-token edges, so there
the block sparsity equals the spec's."""

CUDA_TILE = (8, 16)
"""Tiles on CUDA: 128 tokens, FlexAttention's default block for its Triton kernels (not measured here)."""

EVAL_ELEMENTS = 1 << 24
"""Mask entries evaluated at once while building a BlockMask (a 2K grid has 2.9e8)."""

RECOMPILE_LIMIT = 64
"""Compiled variants of ``flex_attention`` allowed while this backend calls it. Each new shape, dtype or
score function compiles a variant (``dynamic=True`` fails to build the CPU kernel in torch 2.13), and torch's
default of 8 would send the ninth (a second resolution, the bf16 pass) to the unfused path, which
materialises every score."""

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""What FlexAttention's CPU and Triton kernels take (float64 is refused on CPU)."""

IMAGE, TEXT, PAD = 0, 1, -1


def tile_for(device: torch.device) -> tuple[int, int]:
    """The tile (= one mask block) used on ``device``."""
    return CUDA_TILE if device.type == "cuda" else CPU_TILE


@dataclass(frozen=True)
class FlexPlan:
    """Everything about one spec on one device that does not depend on the tensors' values.

    Attributes:
        order: ``[N]`` sequence index of each tile-ordered position (image tiles, then text).
        inverse: ``[N]`` tile-ordered position of each sequence index.
        padded: the sequence rounded up to whole mask blocks (the length of the lookup tables).
        block_mask: the BlockMask over the tile-ordered sequence.
    """

    order: torch.Tensor
    inverse: torch.Tensor
    padded: int
    block_mask: object

    @property
    def block_density(self) -> float:
        """Share of (query block, key block) pairs computed: compare with ``spec.flops_ratio``."""
        return 1.0 - self.block_mask.sparsity() / 100.0


def _tile_order(spec: NeighborhoodSpec, tile: tuple[int, int]) -> torch.Tensor:
    """``[P]`` row-major image index in tile order: by sub-grid, tile, row in tile, column in tile."""
    (dr, dc), (tr, tc) = spec.dilation, tile
    row = torch.arange(spec.grid[0]).repeat_interleave(spec.grid[1])
    col = torch.arange(spec.grid[1]).repeat(spec.grid[0])
    i, j = row // dr, col // dc
    tiles_r, tiles_c = math.ceil(spec.grid[0] / tr), math.ceil(spec.grid[1] / tc)
    key = (row % dr) * dc + col % dc
    for value, size in ((i // tr, tiles_r), (j // tc, tiles_c), (i % tr, tr), (j % tc, tc)):
        key = key * size + value
    return key.argsort()


def _mask_mod(spec: NeighborhoodSpec, image_order: torch.Tensor, padded: int, device: torch.device) -> Callable:
    """The spec's rule on tile-ordered positions through lookup tables: windows are data, not graph constants,
    so specs of one shape share a compiled kernel.

    Positions ``[0, P)`` are the image tokens ``image_order``, then the text tokens, then padding up to
    ``padded`` (never attended).
    """
    num_image = spec.num_image
    row, col = image_order // spec.grid[1], image_order % spec.grid[1]
    (dr, dc), (kr, kc) = spec.dilation, spec.window

    def table(image_values: torch.Tensor, fill: int = 0) -> torch.Tensor:
        values = torch.full((padded,), fill, dtype=torch.int64)
        values[:num_image] = image_values
        return values.to(device)

    kind = table(torch.full((num_image,), IMAGE), fill=PAD)
    kind[num_image : spec.num_tokens] = TEXT
    group = table((row % dr) * dc + col % dc, fill=-1)
    sub_r, sub_c = table(row // dr), table(col // dc)
    start_r, start_c = table(spec.axis_starts(0)[row]), table(spec.axis_starts(1)[col])
    end_r, end_c = table(spec.axis_starts(0)[row] + kr), table(spec.axis_starts(1)[col] + kc)  # empty elsewhere

    def mask_mod(b, h, q_idx, kv_idx):
        kind_q, kind_k = kind[q_idx], kind[kv_idx]
        text = ((kind_q == TEXT) & (kind_k != PAD)) | ((kind_k == TEXT) & (kind_q != PAD))
        rows = (sub_r[kv_idx] >= start_r[q_idx]) & (sub_r[kv_idx] < end_r[q_idx])
        cols = (sub_c[kv_idx] >= start_c[q_idx]) & (sub_c[kv_idx] < end_c[q_idx])
        return text | ((group[q_idx] == group[kv_idx]) & rows & cols)

    return mask_mod


def _block_mask(mask_mod: Callable, tokens: int, block: int, device: torch.device) -> object:
    """A BlockMask from evaluating ``mask_mod`` in chunks of query blocks (``create_block_mask`` holds all)."""
    from torch.nn.attention.flex_attention import BlockMask

    blocks = math.ceil(tokens / block)
    keys = torch.arange(blocks * block, device=device)
    per_chunk = max(1, EVAL_ELEMENTS // (block * keys.numel()))
    touched, full = [], []
    for first in range(0, blocks, per_chunk):
        queries = torch.arange(first * block, min(blocks, first + per_chunk) * block, device=device)
        allowed = mask_mod(None, None, queries[:, None], keys[None, :]).view(-1, block, blocks, block)
        touched.append(allowed.any(dim=3).any(dim=1))
        full.append(allowed.all(dim=3).all(dim=1))
    full_blocks = torch.cat(full)
    partial = torch.cat(touched) & ~full_blocks

    def listed(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = selected.sum(dim=-1, dtype=torch.int32)
        indices = (~selected).to(torch.int8).argsort(dim=-1, stable=True).to(torch.int32)
        return counts[None, None], indices[None, None]

    return BlockMask.from_kv_blocks(
        *listed(partial), *listed(full_blocks), BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(tokens, tokens)
    )


@functools.lru_cache(maxsize=16)
def flex_plan(spec: NeighborhoodSpec, device: torch.device) -> FlexPlan:
    """The cached permutation and BlockMask of ``spec`` on ``device``.

    Example:
        >>> plan = flex_plan(NeighborhoodSpec((16, 16), window=8, stride=8), torch.device("cpu"))
        >>> plan.block_density
        0.25
    """
    tile = tile_for(device)
    block = tile[0] * tile[1]
    padded = math.ceil(spec.num_tokens / block) * block
    image_order = _tile_order(spec, tile)
    image = torch.arange(spec.num_image) + (spec.num_text if spec.text_first else 0)
    text = torch.arange(spec.num_text) + (0 if spec.text_first else spec.num_image)
    order = torch.cat((image[image_order], text))
    mask_mod = _mask_mod(spec, image_order, padded, device)
    return FlexPlan(
        order=order.to(device),
        inverse=order.argsort().to(device),
        padded=padded,
        block_mask=_block_mask(mask_mod, spec.num_tokens, block, device),
    )


@functools.lru_cache(maxsize=1)
def _compiled() -> Callable:
    """``flex_attention`` compiled once per process (uncompiled it materialises the scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _compiler_missing(device: torch.device) -> str | None:
    """What ``torch.compile`` lacks to build FlexAttention's kernel on ``device``: Triton, or a C++ compiler."""
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "Triton is not installed"
    compilers = (os.environ.get("CXX"), "g++", "clang++", "c++")
    return None if any(c and shutil.which(c) for c in compilers) else "no C++ compiler (g++, clang++, $CXX) found"


def check(q: torch.Tensor, spec: NeighborhoodSpec, text_key_mask: torch.Tensor | None) -> Exception | None:
    """FlexAttention needs torch >= 2.5, a compiler for its kernel and a float32/float16/bfloat16 input."""
    try:
        import torch.nn.attention.flex_attention
    except ImportError:
        return RuntimeError(f"torch {torch.__version__} has no FlexAttention; install torch >= 2.5 or use 'tiles'.")
    missing = _compiler_missing(q.device)
    if missing is not None:
        return RuntimeError(f"the flex backend compiles its kernel, but {missing}; install it or use 'tiles'.")
    if q.dtype not in SUPPORTED_DTYPES:
        return ValueError(
            f"the flex backend takes float32, float16 or bfloat16, got {q.dtype}; cast the inputs or use 'tiles'."
        )
    return None


def reorder(x: torch.Tensor, plan: FlexPlan) -> torch.Tensor:
    """``[B, H, N, D]`` sequence order -> tile order (timed on its own by the benchmark)."""
    return x.index_select(2, plan.order)


def restore(x: torch.Tensor, plan: FlexPlan) -> torch.Tensor:
    """Tile order -> sequence order."""
    return x.index_select(2, plan.inverse)


def attend_tiled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: FlexPlan,
    scale: float | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """The compiled kernel on tile-ordered ``[B, H, N, D]`` tensors (what the benchmark times without reordering).

    Args:
        q: tile-ordered queries (:func:`reorder`).
        k: tile-ordered keys.
        v: tile-ordered values.
        plan: the spec's :func:`flex_plan`.
        scale: softmax scale; None is ``1 / sqrt(head_dim)``.
        keep: ``[B, N]`` bool in sequence order, False for keys hidden from every query; None keeps all.
    """
    score_mod = None
    if keep is not None:
        keep = torch.nn.functional.pad(keep[:, plan.order], (0, plan.padded - keep.shape[1]))

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(keep[b, kv_idx], score, -float("inf"))

    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        return _compiled()(q, k, v, score_mod=score_mod, block_mask=plan.block_mask, scale=scale)


def run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: NeighborhoodSpec,
    scale: float,
    text_key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Neighbourhood attention with compiled FlexAttention; shapes ``[B, H, N, D]``."""
    plan = flex_plan(spec, q.device)
    tiled = (reorder(x, plan) for x in (q, k, v))
    return restore(attend_tiled(*tiled, plan, scale, key_keep(text_key_mask, spec)), plan)
