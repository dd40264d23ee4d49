"""Bipartite soft matching on a token grid (ToMe for SD) as pure tensor functions.

The algorithm follows "Token Merging for Fast Stable Diffusion" (Bolya & Hoffman, 2023): one token per
``sy x sx`` cell of the grid is a *dst*, every other token a *src*; each src finds its most similar dst
(cosine similarity) and the ``r`` most similar src are averaged into their dst. The matching is computed
once per layer call and turned into a :class:`TokenMerge`, whose ``merge`` and ``unmerge`` reuse the same
index map, so merging the attention input and unmerging its output cost one scatter and one gather.

Shapes: ``B`` batch, ``N = h * w`` tokens in row-major grid order, ``C`` channels, ``M = N - r``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rng import seeded_randint

SCORE_CHUNK_ELEMENTS = 1 << 25
"""Similarity scores held at once while matching (128 MiB in float32)."""


def dst_partition(
    h: int,
    w: int,
    sx: int,
    sy: int,
    *,
    generator: torch.Generator | None = None,
    seed: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split an ``h x w`` grid into src and dst token positions.

    Each full ``sy x sx`` cell holds one dst, at a random position drawn from ``generator`` (one draw of
    shape ``(h // sy, w // sx, 1)``, as tomesd draws it) or from a fresh generator seeded with ``seed``
    (the same draw, also inside a compiled graph: :func:`attnsurgery.rng.seeded_randint`), or at the cell's
    first position when both are None. Tokens of ragged border cells are all src. Every shape depends on the
    grid alone (no boolean indexing), so a compiled graph holds it without a break.

    Args:
        h: grid height in tokens.
        w: grid width in tokens.
        sx: cell width.
        sy: cell height.
        generator: private generator for the random dst choice.
        seed: 0-d int64 seed of the random dst choice, instead of ``generator``.
        device: device of the returned indices.

    Returns:
        ``(src_pos [N_src], dst_pos [N_dst])``: ascending flat row-major positions, int64.

    Example:
        >>> src, dst = dst_partition(4, 4, 2, 2)
        >>> dst.tolist()
        [0, 2, 8, 10]
    """
    if sx < 1 or sy < 1:
        raise ValueError(f"cell size sx={sx}, sy={sy} must be positive integers")
    cells_y, cells_x = h // sy, w // sx
    if generator is not None:
        offset = torch.randint(sy * sx, (cells_y, cells_x, 1), generator=generator, device=generator.device)
        offset = offset.cpu()
    elif seed is not None:
        offset = seeded_randint(seed, sy * sx, [cells_y, cells_x, 1])
    else:
        offset = torch.zeros(cells_y, cells_x, 1, dtype=torch.int64)
    cell_y = torch.arange(cells_y).view(-1, 1) * sy + torch.div(offset[..., 0], sx, rounding_mode="floor")
    cell_x = torch.arange(cells_x).view(1, -1) * sx + offset[..., 0] % sx
    is_dst = torch.zeros(h * w, dtype=torch.int64)
    is_dst[(cell_y * w + cell_x).flatten()] = 1
    # a stable sort puts the src positions first, then the dst ones, each ascending: no data-dependent shape
    positions = torch.sort(is_dst, stable=True).indices
    num_src = h * w - cells_y * cells_x
    return positions[:num_src].to(device), positions[num_src:].to(device)


@dataclass(frozen=True)
class TokenMatch:
    """One bipartite matching: who is src/dst and how strongly each src wants its best dst.

    Attributes:
        src_pos: ``[N_src]`` grid positions of src tokens.
        dst_pos: ``[N_dst]`` grid positions of dst tokens.
        best_dst: ``[B, N_src]`` index into ``dst_pos`` of each src's most similar dst.
        order: ``[B, N_src]`` src indices sorted by that similarity, most similar first.
    """

    src_pos: torch.Tensor
    dst_pos: torch.Tensor
    best_dst: torch.Tensor
    order: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.src_pos.numel() + self.dst_pos.numel()

    @property
    def num_src(self) -> int:
        return self.src_pos.numel()


def match_tokens(
    metric: torch.Tensor,
    h: int,
    w: int,
    sx: int,
    sy: int,
    *,
    generator: torch.Generator | None = None,
    seed: torch.Tensor | None = None,
) -> TokenMatch:
    """Match every src token of ``metric`` to its most cosine-similar dst token.

    Args:
        metric: ``[B, N, C]`` features to match on (ToMe for SD uses the block input).
        h: grid height, ``h * w == N``.
        w: grid width.
        sx: cell width of the dst partition.
        sy: cell height of the dst partition.
        generator: random dst position per cell; None (or an odd batch, see callers) uses position 0.
        seed: 0-d int64 seed of the random dst positions, instead of ``generator`` (see :func:`dst_partition`).

    Returns:
        The :class:`TokenMatch`; turn it into merge/unmerge with :func:`plan_merge`.

    Example:
        >>> m = match_tokens(torch.randn(2, 16, 8), 4, 4, 2, 2)
        >>> m.best_dst.shape
        torch.Size([2, 12])
    """
    batch, num_tokens, _ = metric.shape
    if h * w != num_tokens:
        raise ValueError(f"grid {h}x{w} has {h * w} tokens but the metric has {num_tokens}")
    src_pos, dst_pos = dst_partition(h, w, sx, sy, generator=generator, seed=seed, device=metric.device)
    if dst_pos.numel() == 0:
        raise ValueError(f"grid {h}x{w} holds no full {sy}x{sx} cell, so there is no dst to merge into")
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        dst_t = unit[:, dst_pos].transpose(-1, -2)
        # Score src in chunks: the full [B, N_src, N_dst] matrix is gigabytes at 2048 px.
        chunk = max(1, SCORE_CHUNK_ELEMENTS // max(1, batch * dst_pos.numel()))
        starts = range(0, src_pos.numel(), chunk)
        best = [(unit[:, src_pos[i : i + chunk]] @ dst_t).max(dim=-1) for i in starts]
        best_score = torch.cat([score for score, _ in best], dim=1)
        best_dst = torch.cat([index for _, index in best], dim=1)
        order = best_score.argsort(dim=-1, descending=True)
    return TokenMatch(src_pos=src_pos, dst_pos=dst_pos, best_dst=best_dst, order=order)


@dataclass(frozen=True)
class TokenMerge:
    """Merge/unmerge for one matching and merge count, sharing a single index map.

    Output order follows tomesd: the unmerged src (most similar first), then the dst clusters. The plan is
    kept twice over: as a scatter (``slot``, ``counts``: what ``merge``/``unmerge`` on ``[B, N, C]`` use,
    as ToMe for SD does) and as gathers (``keep``, ``merged_src``, ``merged_into``: what ``merge_heads`` on
    ``[B, H, N, D]`` attention inputs uses, since scattering there needs a transposed copy of the whole
    sequence that costs more than a low merge ratio saves).

    Attributes:
        slot: ``[B, N]`` output slot of every input token.
        counts: ``[B, M, 1]`` number of input tokens averaged into each slot.
        keep: ``[B, M]`` the input token each slot starts from (its kept src, or its dst).
        merged_src: ``[B, r]`` input tokens added to another slot.
        merged_into: ``[B, r]`` the slot each of those joins.
        clusters: the slots that can hold more than one token (the dst clusters), as ``(start, stop)``.
    """

    slot: torch.Tensor
    counts: torch.Tensor
    keep: torch.Tensor
    merged_src: torch.Tensor
    merged_into: torch.Tensor
    clusters: tuple[int, int]

    @property
    def num_out(self) -> int:
        return self.counts.shape[1]

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, C] -> [B, M, C]``: average the tokens that share a slot."""
        index = self.slot.unsqueeze(-1).expand_as(x)
        summed = x.new_zeros(x.shape[0], self.num_out, x.shape[-1]).scatter_add_(1, index, x)
        return summed / self.counts.to(x.dtype)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, M, C] -> [B, N, C]``: copy every slot back to the tokens merged into it."""
        return y.gather(1, self.slot.unsqueeze(-1).expand(-1, -1, y.shape[-1]))

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, N, D] -> [B, H, M, D]``: what :meth:`merge` does, per head, as gathers along the tokens in
        the order ``x`` lies in memory (diffusers hands attention ``[B, N, H, D]`` permuted) and one add of the
        ``r`` merged rows."""
        rows, dim = _token_rows(x)
        out = rows.new_empty(*rows.shape[:dim], self.num_out, *rows.shape[dim + 1 :])
        for b in range(x.shape[0]):  # index_select takes one index per call; batches are small
            torch.index_select(rows[b], dim - 1, self.keep[b], out=out[b])
            out[b].index_add_(dim - 1, self.merged_into[b], rows[b].index_select(dim - 1, self.merged_src[b]))
        start, stop = self.clusters
        shape = [x.shape[0], 1, 1, 1]
        shape[dim] = stop - start
        out.narrow(dim, start, stop - start).div_(self.counts[:, start:stop].to(x.dtype).view(shape))
        return out if dim == 2 else out.transpose(1, 2)

    def unmerge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, H, M, D] -> [B, H, N, D]``: what :meth:`unmerge` does, per head, one gather per batch row."""
        rows, dim = _token_rows(y)
        out = rows.new_empty(*rows.shape[:dim], self.slot.shape[1], *rows.shape[dim + 1 :])
        for b in range(y.shape[0]):
            torch.index_select(rows[b], dim - 1, self.slot[b], out=out[b])
        return out if dim == 2 else out.transpose(1, 2)

    def with_passthrough(self, num_tokens: int, first: bool) -> TokenMerge:
        """This plan over a sequence that adds ``num_tokens`` never-merged tokens before (``first``) or after
        the merged ones, kept in place: a joint attention call's text tokens around its image tokens.

        Example:
            >>> plan = plan_merge(match_tokens(torch.randn(1, 16, 8), 4, 4, 2, 2), r=6)
            >>> joint = plan.with_passthrough(3, first=True)
            >>> joint.merge_heads(torch.randn(1, 2, 19, 4)).shape, joint.counts[0, :3, 0].tolist()
            (torch.Size([1, 2, 13, 4]), [1.0, 1.0, 1.0])
        """
        batch, device = self.slot.shape[0], self.slot.device
        own = torch.arange(num_tokens, device=device).expand(batch, -1)
        ones = self.counts.new_ones(batch, num_tokens, 1)
        if first:
            shift = num_tokens
            slot = torch.cat((own, self.slot + shift), 1)
            counts = torch.cat((ones, self.counts), 1)
            keep = torch.cat((own, self.keep + shift), 1)
        else:
            shift = 0
            slot = torch.cat((self.slot, own + self.num_out), 1)
            counts = torch.cat((self.counts, ones), 1)
            keep = torch.cat((self.keep, own + self.slot.shape[1]), 1)
        start, stop = self.clusters
        return TokenMerge(
            slot=slot,
            counts=counts,
            keep=keep,
            merged_src=self.merged_src + shift,
            merged_into=self.merged_into + shift,
            clusters=(start + shift, stop + shift),
        )


def _token_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``[B, H, N, D]`` as the view whose token dim (returned) is outermost after the batch in memory: whole
    ``H * D`` rows when ``x`` is a permuted ``[B, N, H, D]`` tensor, so gathers copy long contiguous runs."""
    swapped = x.transpose(1, 2)
    return (swapped, 1) if swapped[0].is_contiguous() and not x[0].is_contiguous() else (x, 2)


def plan_merge(match: TokenMatch, r: int) -> TokenMerge:
    """Build the merge of the ``r`` most similar src into their dst (``r`` capped at the src count).

    Args:
        match: the matching from :func:`match_tokens`.
        r: tokens to remove; ``N - min(r, N_src)`` remain.

    Returns:
        The :class:`TokenMerge` with ``merge`` and ``unmerge``.

    Example:
        >>> plan = plan_merge(match_tokens(torch.randn(1, 16, 8), 4, 4, 2, 2), r=6)
        >>> plan.merge(torch.randn(1, 16, 3)).shape
        torch.Size([1, 10, 3])
    """
    if r < 0:
        raise ValueError(f"merge count r={r} must be >= 0")
    batch, num_src = match.order.shape
    r = min(r, num_src)
    num_kept_src = num_src - r
    device = match.order.device
    merged, kept = match.order[:, :r], match.order[:, r:]
    slot = torch.empty(batch, match.num_tokens, dtype=torch.int64, device=device)
    slot[:, match.dst_pos] = num_kept_src + torch.arange(match.dst_pos.numel(), device=device)
    slot.scatter_(1, match.src_pos[kept], torch.arange(num_kept_src, device=device).expand(batch, -1))
    merged_src, merged_into = match.src_pos[merged], num_kept_src + match.best_dst.gather(1, merged)
    slot.scatter_(1, merged_src, merged_into)
    num_out = match.num_tokens - r
    counts = torch.zeros(batch, num_out, device=device)
    counts.scatter_add_(1, slot, torch.ones(slot.shape, device=device))
    return TokenMerge(
        slot=slot,
        counts=counts.unsqueeze(-1),
        keep=torch.cat((match.src_pos[kept], match.dst_pos.expand(batch, -1)), 1),
        merged_src=merged_src,
        merged_into=merged_into,
        clusters=(num_kept_src, num_out),
    )
