"""SDPA over tiles: image queries cut into stride-aligned tiles, each attending one gathered key window.

All queries of one stride group share a key window (the spec's rule), so a tile of whole groups needs only
the union of its groups' windows: for a tile of ``t`` queries (a multiple of the stride ``s``) on an axis
that is the ``k + t - s`` positions from its first group's window start (the "halo"). When ``t == s`` the
halo is the window itself and no mask is needed; a smaller stride would make one SDPA call per few queries,
so tiles grow to about :data:`TILE_TARGET` and a boolean mask over the halo keeps each query to its own
window. Text keys are appended to every tile's keys; text queries take one dense SDPA call. Dilation runs
each sub-grid (rows ``r::d``, cols ``c::d``) as its own undilated problem.

Tiles whose halo reaches past the grid are padded with queries that reuse the last real query's window and
are dropped afterwards, so no row is ever fully masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnsurgery.ops.neighborhood_backends.common import attend_text_queries, join_tokens, key_keep
from attnsurgery.ops.neighborhood_spec import NeighborhoodSpec, window_start

TILE_TARGET = 16
"""Query tile side when the stride is smaller: 16 x 16 queries share a 79 x 79 halo for a 64 window (ours)."""

GATHER_ELEMENTS = 1 << 26
"""Gathered key elements held at once (256 MiB in float32 per K and V): tiles are attended in chunks."""


@dataclass(frozen=True)
class AxisTiles:
    """How one undilated axis of length ``length`` is cut into query tiles and their key halos.

    Attributes:
        tile: queries per tile ``t``.
        halo: keys per tile ``h = min(k + t - s, length)``.
        starts: ``[tiles]`` first key of each tile's halo.
        mask: ``[tiles, t, h]`` bool, query attends halo key; None when every query sees its whole halo.
    """

    tile: int
    halo: int
    starts: torch.Tensor
    mask: torch.Tensor | None

    @property
    def count(self) -> int:
        return self.starts.numel()


def axis_tiles(length: int, window: int, stride: int) -> AxisTiles:
    """Tiles for one axis; a window covering the axis gives one tile of the whole axis.

    Example:
        >>> plan = axis_tiles(40, 16, 16)  # blocked: each tile is one stride group, its halo its window
        >>> plan.tile, plan.halo, plan.starts.tolist(), plan.mask is None
        (16, 16, [0, 16, 24], True)
        >>> plan = axis_tiles(40, 16, 1)  # 16 queries, 31 keys, each query masked to its 16
        >>> plan.tile, plan.halo, plan.starts.tolist(), plan.mask.sum(-1).unique().tolist()
        (16, 31, [0, 8, 9], [16])
    """
    tile = length if window == length else stride * max(1, TILE_TARGET // stride)
    tile = min(tile, length)
    halo = min(window + tile - stride, length)
    count = math.ceil(length / tile)
    starts = [min(window_start(g * tile, length, window, stride), length - halo) for g in range(count)]
    query = torch.arange(count * tile).clamp(max=length - 1)  # padded queries reuse the last window
    query_start = torch.tensor([window_start(int(i), length, window, stride) for i in query])
    key = torch.tensor(starts)[:, None] + torch.arange(halo)  # [tiles, halo]
    offset = key[:, None, :] - query_start.view(count, tile, 1)
    mask = (offset >= 0) & (offset < window)
    return AxisTiles(tile, halo, torch.tensor(starts), None if bool(mask.all()) else mask)


def _to_tiles(x: torch.Tensor, rows: AxisTiles, cols: AxisTiles) -> torch.Tensor:
    """``[B, H, Mr, Mc, D]`` -> ``[B, tiles, H, tr * tc, D]``, zero-padded to whole tiles."""
    batch, heads, side_r, side_c, dim = x.shape
    x = F.pad(x, (0, 0, 0, cols.count * cols.tile - side_c, 0, rows.count * rows.tile - side_r))
    x = x.view(batch, heads, rows.count, rows.tile, cols.count, cols.tile, dim).permute(0, 2, 4, 1, 3, 5, 6)
    return x.reshape(batch, rows.count * cols.count, heads, rows.tile * cols.tile, dim)


def _from_tiles(x: torch.Tensor, rows: AxisTiles, cols: AxisTiles, side: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`_to_tiles`, cropping the padding: ``[B, H, Mr, Mc, D]``."""
    batch, _, heads, _, dim = x.shape
    x = x.view(batch, rows.count, cols.count, heads, rows.tile, cols.tile, dim).permute(0, 3, 1, 4, 2, 5, 6)
    x = x.reshape(batch, heads, rows.count * rows.tile, cols.count * cols.tile, dim)
    return x[:, :, : side[0], : side[1]]


def _ones_or(mask: torch.Tensor | None, shape: tuple[int, int, int]) -> torch.Tensor:
    return mask if mask is not None else torch.ones(shape, dtype=torch.bool)


def _gather_keys(flat: torch.Tensor, text: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each tile's halo keys then every text key: ``[B, H, M, D]``, ``[B, H, T, D]`` -> ``[B * tiles, H, h + T, D]``."""
    batch, heads, _, dim = flat.shape
    count, num_text = index.shape[0], text.shape[2]
    tiles = flat.index_select(2, index.flatten()).view(batch, heads, count, -1, dim).transpose(1, 2)
    text = text[:, None].expand(batch, count, heads, num_text, dim)
    return torch.cat((tiles, text), dim=3).reshape(batch * count, heads, -1, dim)


def _tile_mask(
    geometric: torch.Tensor | None,
    count: int,
    halo_keys: int,
    batch: int,
    text_keep: torch.Tensor | None,
    num_text: int,
) -> torch.Tensor | None:
    """``[B * tiles, 1, queries or 1, h + T]`` bool for a chunk of tiles, or None when nothing is masked.

    Args:
        geometric: ``[tiles, queries, h]`` the chunk's halo mask, or None (every query sees its halo).
        count: tiles in the chunk.
        halo_keys: ``h``.
        batch: ``B``.
        text_keep: ``[B, T]`` text keys to keep, or None.
        num_text: ``T``.
    """
    if geometric is None and text_keep is None:
        return None
    if geometric is None:
        image = torch.ones(1, 1, 1, halo_keys, dtype=torch.bool, device=text_keep.device)
    else:
        image = geometric[None]
    queries = image.shape[2]
    image = image.expand(batch, count, queries, halo_keys)
    text = torch.ones(1, num_text, dtype=torch.bool, device=image.device) if text_keep is None else text_keep
    text = text[:, None, None, :].expand(batch, count, queries, num_text)
    return torch.cat((image, text), dim=3).reshape(batch * count, 1, queries, -1)


def _attend_subgrid(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_k: torch.Tensor,
    text_v: torch.Tensor,
    spec: NeighborhoodSpec,
    scale: float,
    text_keep: torch.Tensor | None,
) -> torch.Tensor:
    """Undilated neighbourhood attention of one sub-grid ``[B, H, Mr, Mc, D]`` plus the text keys."""
    batch, heads, side_r, side_c, dim = q.shape
    rows = axis_tiles(side_r, spec.window[0], spec.stride[0])
    cols = axis_tiles(side_c, spec.window[1], spec.stride[1])
    device = q.device
    halo_r = rows.starts.to(device)[:, None] + torch.arange(rows.halo, device=device)
    halo_c = cols.starts.to(device)[:, None] + torch.arange(cols.halo, device=device)
    # [tiles, halo_r * halo_c]: flat sub-grid index of each tile's keys, tiles row-major
    index = (halo_r[:, None, :, None] * side_c + halo_c[None, :, None, :]).reshape(rows.count * cols.count, -1)
    geometric = None
    if rows.mask is not None or cols.mask is not None:
        mask_r = _ones_or(rows.mask, (rows.count, rows.tile, rows.halo))
        mask_c = _ones_or(cols.mask, (cols.count, cols.tile, cols.halo))
        geometric = mask_r[:, None, :, None, :, None] & mask_c[None, :, None, :, None, :]
        geometric = geometric.reshape(rows.count * cols.count, rows.tile * cols.tile, -1).to(device)
    q_tiles = _to_tiles(q, rows, cols)
    k_flat, v_flat = (x.reshape(batch, heads, side_r * side_c, dim) for x in (k, v))
    chunk = max(1, GATHER_ELEMENTS // (batch * heads * (index.shape[1] + text_k.shape[2]) * dim))
    outputs = []
    for first in range(0, index.shape[0], chunk):
        part = index[first : first + chunk]
        count = part.shape[0]
        chunk_mask = None if geometric is None else geometric[first : first + count]
        mask = _tile_mask(chunk_mask, count, part.shape[1], batch, text_keep, text_k.shape[2])
        query = q_tiles[:, first : first + count].reshape(batch * count, heads, -1, dim)
        keys, values = _gather_keys(k_flat, text_k, part), _gather_keys(v_flat, text_v, part)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
        outputs.append(out.view(batch, count, heads, -1, dim))
    return _from_tiles(torch.cat(outputs, dim=1), rows, cols, (side_r, side_c))


def check(q: torch.Tensor, spec: NeighborhoodSpec, text_key_mask: torch.Tensor | None) -> Exception | None:
    """Tiles run wherever SDPA does: any floating-point dtype on any device."""
    if not q.is_floating_point():
        return ValueError(f"the tiles backend needs floating-point tensors, got {q.dtype}; cast q, k, v first.")
    return None


def run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: NeighborhoodSpec,
    scale: float,
    text_key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Neighbourhood attention by tiles; shapes ``[B, H, N, D]``."""
    batch, heads, _, dim = q.shape
    image, text = spec.image_slice(), spec.text_slice()
    grid_shape = (batch, heads, *spec.grid, dim)
    q_grid, k_grid, v_grid = (x[:, :, image].reshape(grid_shape) for x in (q, k, v))
    out = torch.empty_like(q_grid)
    (dr, dc), (text_k, text_v) = spec.dilation, (k[:, :, text], v[:, :, text])
    for r in range(dr):
        for c in range(dc):
            sub = (slice(None), slice(None), slice(r, None, dr), slice(c, None, dc))
            out[sub] = _attend_subgrid(
                q_grid[sub], k_grid[sub], v_grid[sub], text_k, text_v, spec, scale, text_key_mask
            )
    text_out = attend_text_queries(q, k, v, spec, scale, key_keep(text_key_mask, spec))
    return join_tokens(text_out, out.reshape(batch, heads, spec.num_image, dim), spec)
