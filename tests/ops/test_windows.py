"""Window partition/merge for MSW-MSA against an explicit float64 window-attention map."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnsurgery.ops.windows import (
    NUM_SHIFTS,
    WindowGrid,
    draw_shift_index,
    key_mask_to_bias,
    merge_windows,
    partition_windows,
    shift_for_index,
    window_key_mask,
)

HEADS = 2


def reference_window_attention(q, k, v, grid: WindowGrid) -> torch.Tensor:
    """Global attention with an explicit N x N map, masked to pairs that share a shifted window.

    Window membership comes straight from coordinates: after rolling by -shift, token (r, c) sits at
    ((r - sh) mod H, (c - sw) mod W) and belongs to window (row // wh, col // ww).
    q, k, v: [batch, tokens, heads * head_dim] float64 -> same shape.
    """
    batch, tokens, channels = q.shape
    head_dim = channels // HEADS
    rows = torch.arange(grid.height).repeat_interleave(grid.width)
    cols = torch.arange(grid.width).repeat(grid.height)
    wh, ww = grid.window
    window_row = (rows - grid.shift[0]) % grid.height // wh
    window_col = (cols - grid.shift[1]) % grid.width // ww
    window_id = window_row * grid.cols + window_col
    same_window = window_id[:, None] == window_id[None, :]

    def heads(x):
        return x.view(batch, tokens, HEADS, head_dim).transpose(1, 2)

    scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(head_dim)
    scores = scores.masked_fill(~same_window, float("-inf"))
    out = scores.softmax(dim=-1) @ heads(v)
    return out.transpose(1, 2).reshape(batch, tokens, channels)


def windowed_sdpa(q, k, v, grid: WindowGrid) -> torch.Tensor:
    """The way the MSW-MSA processor uses the ops: partition, attend per window with the key mask, merge."""
    qw, kw, vw = (partition_windows(x, grid) for x in (q, k, v))
    n, tokens, channels = qw.shape
    head_dim = channels // HEADS

    def heads(x):
        return x.view(n, tokens, HEADS, head_dim).transpose(1, 2)

    mask = window_key_mask(grid, q.device)
    bias = None
    if mask is not None:
        bias = key_mask_to_bias(mask.repeat(q.shape[0], 1), q.dtype).unsqueeze(1)
    out = F.scaled_dot_product_attention(heads(qw), heads(kw), heads(vw), attn_mask=bias)
    return merge_windows(out.transpose(1, 2).reshape(n, tokens, channels), grid)


def random_qkv(batch: int, tokens: int, channels: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, tokens, channels, generator=g, dtype=torch.float64) for _ in range(3)]


SIZES = [(8, 8), (6, 10), (5, 7), (7, 4), (9, 9), (2, 3)]


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("shift_index", range(NUM_SHIFTS))
def test_windowed_attention_matches_float64_reference(height, width, shift_index):
    grid0 = WindowGrid(height, width)
    grid = WindowGrid(height, width, shift=shift_for_index(grid0.window, shift_index))
    q, k, v = random_qkv(2, height * width)
    ours = windowed_sdpa(q, k, v, grid)
    reference = reference_window_attention(q, k, v, grid)
    plain = reference_window_attention(q, k, v, WindowGrid(height, width, rows=1, cols=1))
    # The windows really restrict attention: the result differs from global attention.
    assert (reference - plain).abs().max() > 1e-3
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("shift", [(0, 0), (1, 2), (3, 1)])
def test_merge_inverts_partition_exactly(height, width, shift):
    grid = WindowGrid(height, width, shift=shift)
    tokens = torch.randn(3, height * width, 5)
    windows = partition_windows(tokens, grid)
    assert windows.shape == (3 * 4, grid.tokens_per_window, 5)
    assert torch.equal(merge_windows(windows, grid), tokens)


def test_window_layout_is_batch_major_row_major():
    grid = WindowGrid(4, 6)  # windows of 2 x 3
    tokens = torch.arange(2 * 24, dtype=torch.float32).view(2, 24, 1)
    windows = partition_windows(tokens, grid)
    assert windows[0, :, 0].tolist() == [0, 1, 2, 6, 7, 8]  # batch 0, top-left
    assert windows[1, :, 0].tolist() == [3, 4, 5, 9, 10, 11]  # batch 0, top-right
    assert windows[4, :, 0].tolist() == [24, 25, 26, 30, 31, 32]  # batch 1, top-left


def test_shift_rolls_tokens_towards_the_origin():
    grid = WindowGrid(4, 4, shift=(1, 1))
    tokens = torch.arange(16, dtype=torch.float32).view(1, 16, 1)
    first_window = partition_windows(tokens, grid)[0, :, 0]
    assert first_window.tolist() == [5, 6, 9, 10]


def test_one_window_is_plain_attention():
    q, k, v = random_qkv(2, 6 * 5)
    grid = WindowGrid(6, 5, rows=1, cols=1)
    assert torch.equal(partition_windows(q, grid), q)
    assert window_key_mask(grid) is None
    plain = F.scaled_dot_product_attention(q, k, v)  # single head over all channels
    windows = F.scaled_dot_product_attention(*(partition_windows(x, grid) for x in (q, k, v)))
    assert torch.equal(merge_windows(windows, grid), plain)


@pytest.mark.parametrize("height,width", SIZES)
def test_key_mask_marks_exactly_the_real_tokens(height, width):
    grid = WindowGrid(height, width, shift=(1, 1))
    mask = window_key_mask(grid)
    if (height % 2, width % 2) == (0, 0):
        assert mask is None
        return
    assert mask.shape == (4, grid.tokens_per_window)
    assert int(mask.sum()) == height * width
    assert mask.any(dim=1).all()  # no window is all padding
    # Real slots are exactly where real tokens land.
    ones = partition_windows(torch.ones(1, height * width, 1), grid)[..., 0]
    assert torch.equal(ones.bool(), mask)


def test_key_mask_bias_is_finite_and_blocks_padding():
    mask = torch.tensor([[True, False, True]])
    bias = key_mask_to_bias(mask, torch.float16)
    assert bias.shape == (1, 1, 3)
    assert torch.isfinite(bias).all()
    assert bias[0, 0, 0] == 0 and bias[0, 0, 1] == torch.finfo(torch.float16).min


def test_shift_options_follow_the_quarter_window_rule():
    assert [shift_for_index((12, 9), i) for i in range(NUM_SHIFTS)] == [(0, 0), (3, 2), (6, 4), (9, 6)]
    with pytest.raises(ValueError, match="shift index"):
        shift_for_index((8, 8), 4)


def test_shift_draws_are_private_and_reproducible():
    global_state = torch.get_rng_state()
    draws = [draw_shift_index(torch.Generator().manual_seed(7)) for _ in range(3)]
    g = torch.Generator().manual_seed(3)
    sequence = [draw_shift_index(g) for _ in range(64)]
    assert torch.equal(torch.get_rng_state(), global_state)
    assert len(set(draws)) == 1
    assert set(sequence) == set(range(NUM_SHIFTS))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(height=0, width=4), "non-empty"),
        (dict(height=4, width=4, rows=0), "at least one window"),
        (dict(height=5, width=4, rows=4), "only padding"),
    ],
)
def test_bad_grids_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WindowGrid(**kwargs)


def test_token_count_mismatch_names_the_grid():
    with pytest.raises(ValueError, match="4x4 grid"):
        partition_windows(torch.zeros(1, 15, 2), WindowGrid(4, 4))
