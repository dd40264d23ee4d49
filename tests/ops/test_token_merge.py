"""Token merging ops against a plainly written float64 reference and against tomesd's merge function."""

from __future__ import annotations

import pytest
import torch

from attnsurgery.ops.token_merge import dst_partition, match_tokens, plan_merge


def reference_merge(metric: torch.Tensor, x: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int):
    """Explicit loops: dst at position 0 of every full cell, clusters averaged, unmerge copies back.

    Returns (merged tokens as a sorted list of rows per batch item, unmerged [B, N, C]).
    """
    batch, num_tokens, _ = x.shape
    dst = [(cy * sy) * w + cx * sx for cy in range(h // sy) for cx in range(w // sx)]
    src = [p for p in range(num_tokens) if p not in dst]
    merged_rows, unmerged = [], torch.empty_like(x)
    for b in range(batch):
        unit = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        best = {}
        for s in src:
            sims = [float(unit[s] @ unit[d]) for d in dst]
            best[s] = (max(sims), dst[sims.index(max(sims))])
        ranked = sorted(src, key=lambda s: -best[s][0])
        clusters = {d: [d] for d in dst}
        singles = ranked[min(r, len(src)) :]
        for s in ranked[: min(r, len(src))]:
            clusters[best[s][1]].append(s)
        rows = [x[b, s] for s in singles] + [x[b, members].mean(0) for members in clusters.values()]
        merged_rows.append(torch.stack(rows))
        for s in singles:
            unmerged[b, s] = x[b, s]
        for members in clusters.values():
            for p in members:
                unmerged[b, p] = x[b, members].mean(0)
    return torch.stack(merged_rows), unmerged


def sorted_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows of [M, C] in lexicographic order, so token order does not matter in comparisons."""
    keys = t[:, 0].argsort()
    return t[keys]


@pytest.mark.parametrize("h,w,sx,sy,r", [(8, 8, 2, 2, 20), (6, 10, 2, 2, 25), (7, 9, 2, 2, 13), (8, 8, 4, 4, 1000)])
def test_merge_matches_float64_reference(h, w, sx, sy, r):
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(3, h * w, 6, generator=gen, dtype=torch.float64)
    x = torch.randn(3, h * w, 5, generator=gen, dtype=torch.float64)
    plan = plan_merge(match_tokens(metric, h, w, sx, sy), r)
    want_merged, want_unmerged = reference_merge(metric, x, h, w, sx, sy, r)
    merged = plan.merge(x)
    assert merged.shape == want_merged.shape
    assert merged.shape[1] < h * w  # the merge removed tokens
    for b in range(3):
        torch.testing.assert_close(sorted_rows(merged[b]), sorted_rows(want_merged[b]))
    torch.testing.assert_close(plan.unmerge(merged), want_unmerged)


def test_r_is_capped_at_the_src_count():
    metric = torch.randn(2, 64, 4, dtype=torch.float64)
    plan = plan_merge(match_tokens(metric, 8, 8, 4, 4), r=10_000)
    assert plan.num_out == 4  # only the 4 dst clusters remain


def test_dst_partition_random_positions_follow_the_generator():
    src, dst = dst_partition(9, 8, 2, 4, generator=torch.Generator().manual_seed(3))
    assert dst.numel() == (9 // 4) * (8 // 2) and src.numel() + dst.numel() == 72
    rows, cols = dst // 8, dst % 8
    cell = (rows // 4) * 4 + cols // 2
    assert sorted(cell.tolist()) == list(range(8))  # one dst per full cell, none in the ragged last row
    assert (rows < 8).all()
    offsets = torch.randint(8, (2, 4, 1), generator=torch.Generator().manual_seed(3)).flatten()
    by_cell = cell.argsort()
    assert ((rows % 4) * 2 + cols % 2)[by_cell].tolist() == offsets.tolist()
    assert not (offsets == 0).all()  # the random choice is not the fixed one


@pytest.mark.parametrize("seeded", [False, True])
def test_equals_tomesd_merge_given_the_same_dst_choice(seeded):
    tomesd_merge = pytest.importorskip("tomesd.merge")
    h, w, r = 12, 10, 48
    metric = torch.randn(2, h * w, 16, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, h * w, 8, generator=torch.Generator().manual_seed(2))
    ours_gen = torch.Generator().manual_seed(5) if seeded else None
    theirs_gen = torch.Generator().manual_seed(5)
    plan = plan_merge(match_tokens(metric, h, w, 2, 2, generator=ours_gen), r)
    m, u = tomesd_merge.bipartite_soft_matching_random2d(metric, w, h, 2, 2, r, not seeded, theirs_gen)
    theirs = m(x)
    assert not torch.allclose(u(theirs), x)  # the merge is not the identity
    for b in range(2):
        torch.testing.assert_close(sorted_rows(plan.merge(x)[b]), sorted_rows(theirs[b]))
    torch.testing.assert_close(plan.unmerge(plan.merge(x)), u(theirs))


def test_half_precision_merge_stays_close():
    metric = torch.randn(2, 64, 8, dtype=torch.float64)
    x = torch.randn(2, 64, 8, dtype=torch.float64)
    plan = plan_merge(match_tokens(metric, 8, 8, 2, 2), 30)
    torch.testing.assert_close(plan.merge(x.bfloat16()).double(), plan.merge(x), atol=2e-2, rtol=2e-2)


def test_bad_grid_is_rejected():
    with pytest.raises(ValueError, match="grid 8x7"):
        match_tokens(torch.randn(1, 64, 4), 8, 7, 2, 2)
    with pytest.raises(ValueError, match="no full 4x4 cell"):
        match_tokens(torch.randn(1, 9, 4), 3, 3, 4, 4)


def test_chunked_scoring_gives_the_same_matching(monkeypatch):
    from attnsurgery.ops import token_merge

    metric = torch.randn(2, 96, 8, dtype=torch.float64)
    whole = match_tokens(metric, 8, 12, 2, 2)
    monkeypatch.setattr(token_merge, "SCORE_CHUNK_ELEMENTS", 2 * 24 * 5)  # 5 src rows per chunk
    chunked = match_tokens(metric, 8, 12, 2, 2)
    assert torch.equal(whole.best_dst, chunked.best_dst) and torch.equal(whole.order, chunked.order)


def _head_layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One ``[B, H, N, D]`` tensor in the layouts attention calls hand over: head-major, a permuted
    ``[B, N, H, D]`` (diffusers' processors), and a slice of a longer sequence."""
    longer = torch.cat((x, x[:, :, :3]), 2)
    return {
        "head-major": x.contiguous(),
        "token-major": x.transpose(1, 2).contiguous().transpose(1, 2),
        "sliced": longer[:, :, : x.shape[2]],
    }


@pytest.mark.parametrize("layout", ["head-major", "token-major", "sliced"])
def test_gather_merge_per_head_equals_the_scatter_merge(layout):
    """merge_heads/unmerge_heads (gathers, used in attention calls) against merge/unmerge (ToMe's scatter)."""
    b, h, n, d = 2, 3, 24, 5
    x = torch.randn(b, h, n, d, dtype=torch.float64)
    plan = plan_merge(match_tokens(torch.randn(b, n, 4), 4, 6, 2, 2), r=10)
    assert plan.counts.max() > 1  # clusters of several tokens exist
    flat = x.transpose(1, 2).reshape(b, n, h * d)
    expected = plan.merge(flat).reshape(b, -1, h, d).transpose(1, 2)
    merged = plan.merge_heads(_head_layouts(x)[layout])
    torch.testing.assert_close(merged, expected, rtol=1e-12, atol=1e-12)
    back = plan.unmerge_heads(_head_layouts(merged)[layout])
    torch.testing.assert_close(back, plan.unmerge(plan.merge(flat)).reshape(b, n, h, d).transpose(1, 2))


@pytest.mark.parametrize("first", [True, False])
def test_passthrough_tokens_stay_in_place_unmerged(first):
    b, h, n, d, extra = 2, 2, 16, 4, 3
    plan = plan_merge(match_tokens(torch.randn(b, n, 4), 4, 4, 2, 2), r=6)
    joint = plan.with_passthrough(extra, first)
    x = torch.randn(b, h, n + extra, d, dtype=torch.float64)
    text, image = (x[:, :, :extra], x[:, :, extra:]) if first else (x[:, :, n:], x[:, :, :n])
    merged_image = plan.merge_heads(image)
    expected = torch.cat((text, merged_image) if first else (merged_image, text), 2)
    torch.testing.assert_close(joint.merge_heads(x), expected, rtol=1e-12, atol=1e-12)
    assert joint.counts.shape[1] == n - 6 + extra and joint.counts.sum() == b * (n + extra)
    # the text slots keep count 1; unmerge gives every token its slot back, text in place
    out = joint.unmerge_heads(joint.merge_heads(x))
    torch.testing.assert_close(out[:, :, :extra] if first else out[:, :, n:], text)
