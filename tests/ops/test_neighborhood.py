"""Neighbourhood attention: the spec's rule by hand, the reference against a per-query brute force, every
backend against the float64 reference, and every bad input.

Flex cases compile FlexAttention on the CPU; the shapes are small and few dtypes are compiled, so the file
stays well under a minute on one thread (torch.compile's automatic dynamic shapes reuse one graph per dtype).
"""

from __future__ import annotations

import importlib.util
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from attnsurgery.ops.neighborhood import choose_backend, neighborhood_attention
from attnsurgery.ops.neighborhood_backends.flex import flex_plan
from attnsurgery.ops.neighborhood_spec import NeighborhoodSpec, window_start
from tests.support.benchmarks import run_benchmark

HEADS, HEAD_DIM = 2, 8
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 4e-2}
"""Max abs error against the float64 reference: fp32 rounding; bf16 inputs (8 mantissa bits) and outputs."""


def qkv(batch: int, tokens: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, HEADS, tokens, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(3)]


def brute_force(q, k, v, grid, window, stride, dilation, num_text, text_first, keep=None) -> torch.Tensor:
    """One query at a time, each key set written out from the spec's text (no code shared with the op)."""

    def axis_keys(i: int, side: int, k: int, s: int, d: int) -> list[int]:
        k = min(k, side)
        r, j = i % d, i // d
        length = len(range(r, side, d))
        start = max(0, min((j // s) * s + math.floor((s - k) / 2), length - k))
        return [r + d * (start + n) for n in range(k)]

    batch, heads, tokens, _ = q.shape
    text = list(range(num_text)) if text_first else list(range(tokens - num_text, tokens))
    first_image = num_text if text_first else 0
    out = torch.empty_like(q)
    for t in range(tokens):
        if t in text:
            keys = list(range(tokens))
        else:
            row, col = divmod(t - first_image, grid[1])
            rows = axis_keys(row, grid[0], window[0], stride[0], dilation[0])
            cols = axis_keys(col, grid[1], window[1], stride[1], dilation[1])
            keys = sorted(first_image + r * grid[1] + c for r in rows for c in cols) + text
        for b in range(batch):
            kept = [key for key in keys if keep is None or key not in text or bool(keep[b, text.index(key)])]
            scores = torch.einsum("hd,hnd->hn", q[b, :, t], k[b, :, kept]) / math.sqrt(q.shape[-1])
            out[b, :, t] = torch.einsum("hn,hnd->hd", scores.softmax(dim=-1), v[b, :, kept])
    return out


# ------------------------------------------------------------------------------------------------------
# the rule by hand


def test_window_start_by_hand():
    # odd window, stride 1: clamped inward at both borders
    assert [window_start(i, 7, 3, 1) for i in range(7)] == [0, 0, 1, 2, 3, 4, 4]
    # even window: floor((1 - 4) / 2) = -2, so two keys before the query and one after
    assert [window_start(i, 8, 4, 1) for i in range(8)] == [0, 0, 0, 1, 2, 3, 4, 4]
    # stride between: pairs of queries share a window
    assert [window_start(i, 8, 4, 2) for i in range(8)] == [0, 0, 1, 1, 3, 3, 4, 4]
    # stride == window: blocked, the last block pushed inward
    assert [window_start(i, 10, 4, 4) for i in range(10)] == [0] * 4 + [4] * 4 + [6] * 2
    # window == length: everyone sees the whole axis
    assert {window_start(i, 5, 5, 1) for i in range(5)} == {0}


def test_dilated_axis_keys_by_hand():
    # 9 columns, dilation 2: sub-axes 0,2,4,6,8 and 1,3,5,7; window 3
    spec = NeighborhoodSpec((1, 9), window=(1, 3), dilation=(1, 2))
    keys = spec.axis_keys(1).tolist()
    assert keys[0] == [0, 2, 4] and keys[4] == [2, 4, 6] and keys[8] == [4, 6, 8]
    assert keys[1] == [1, 3, 5] and keys[7] == [3, 5, 7] and keys[5] == [3, 5, 7]


def test_spec_clamps_a_window_larger_than_the_grid_and_counts_flops():
    spec = NeighborhoodSpec((6, 9), window=(10, 4), stride=(8, 2))
    assert spec.window == (6, 4) and spec.stride == (6, 2)
    assert not spec.is_dense and NeighborhoodSpec((6, 9), window=64).is_dense
    assert NeighborhoodSpec((6, 9), window=64, num_text=5).flops_ratio == 1.0
    assert NeighborhoodSpec((4, 4), window=2).flops_ratio == 0.25
    # 16 image queries x (4 + 4 text) keys, 4 text queries x 20 keys, over 20 x 20
    assert NeighborhoodSpec((4, 4), window=2, num_text=4).flops_ratio == (16 * 8 + 4 * 20) / 400


def test_every_query_sees_exactly_window_keys_per_axis():
    spec = NeighborhoodSpec((11, 13), window=(4, 5), stride=(2, 3), dilation=(2, 2))
    assert spec.axis_mask(0).sum(1).eq(4).all() and spec.axis_mask(1).sum(1).eq(5).all()
    assert spec.image_mask().sum(1).eq(20).all()


# ------------------------------------------------------------------------------------------------------
# the reference itself

BRUTE_CASES = [
    # grid, window, stride, dilation, num_text, text_first
    ((5, 7), (3, 4), (1, 2), (1, 1), 3, True),
    ((6, 7), (2, 3), (2, 3), (2, 2), 2, False),
]


@pytest.mark.parametrize("grid,window,stride,dilation,num_text,text_first", BRUTE_CASES)
def test_reference_equals_a_per_query_brute_force(grid, window, stride, dilation, num_text, text_first):
    tokens = num_text + grid[0] * grid[1]
    q, k, v = qkv(2, tokens)
    keep = torch.tensor([[True] * num_text, [True] * (num_text - 1) + [False]])
    for mask in (None, keep):
        expected = brute_force(q, k, v, grid, window, stride, dilation, num_text, text_first, mask)
        out = neighborhood_attention(
            q, k, v, grid, window, stride, dilation, num_text=num_text, text_first=text_first,
            backend="reference", text_key_mask=mask,
        )  # fmt: skip
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------------
# every backend against the float64 reference

# All 300 tokens, batch 2: FlexAttention compiles one kernel per shape, so the flex cases share one shape
# (one compile per dtype and score function) and differ in geometry only. Grids are non-square and ragged
# for 8 x 8 flex tiles and 16-query SDPA tiles.
CASES = {
    # grid, window, stride, dilation, num_text, text_first
    "odd-even-window-stride-between": ((17, 17), (5, 4), (1, 2), 1, 11, True),
    "blocked-ragged-no-text": ((15, 20), (4, 6), (4, 6), 1, 0, True),
    "dilated-text-last": ((12, 24), (4, 3), (2, 1), (2, 3), 12, False),
    "dilated-strided": ((14, 21), (5, 2), (3, 2), 2, 6, True),
    "several-tiles-borders": ((18, 16), (6, 5), 1, 1, 12, False),
    "stride-16-ragged-tiles": ((10, 29), (8, 16), (8, 16), 1, 10, True),
}
BATCH = 2


def run_case(case: tuple, backend: str, dtype: torch.dtype, masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    grid, window, stride, dilation, num_text, text_first = case
    q, k, v = qkv(BATCH, num_text + grid[0] * grid[1])
    mask = None
    if masked and num_text:
        mask = torch.ones(BATCH, num_text, dtype=torch.bool)
        mask[-1, num_text // 2 :] = False
    kwargs = {"num_text": num_text, "text_first": text_first, "text_key_mask": mask}
    expected = neighborhood_attention(q, k, v, grid, window, stride, dilation, backend="reference", **kwargs)
    inputs = [x.to(dtype) for x in (q, k, v)]
    out = neighborhood_attention(*inputs, grid, window, stride, dilation, backend=backend, **kwargs)
    assert out.dtype == dtype and out.shape == q.shape
    return out.double(), expected


@pytest.mark.parametrize("masked", [False, True], ids=["all-text", "text-key-mask"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_tiles_match_the_reference(case, dtype, masked):
    out, expected = run_case(case, "tiles", dtype, masked)
    torch.testing.assert_close(out, expected, atol=TOLERANCE[dtype], rtol=0)


# every geometry without a text key mask; the score-function path (text_key_mask) and bf16 on a few
FLEX_CASES = [(name, False, torch.float32) for name in CASES] + [
    ("odd-even-window-stride-between", True, torch.float32),
    ("dilated-text-last", True, torch.float32),
    ("dilated-text-last", False, torch.bfloat16),
]


@pytest.mark.parametrize("name,masked,dtype", FLEX_CASES, ids=lambda x: str(x))
def test_flex_matches_the_reference(name, masked, dtype):
    out, expected = run_case(CASES[name], "flex", dtype, masked)
    torch.testing.assert_close(out, expected, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and importlib.util.find_spec("natten")),
    reason="the natten backend needs the natten package and a CUDA device",
)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_natten_matches_the_reference_on_cuda(case):
    grid, window, stride, dilation, num_text, text_first = case
    q, k, v = qkv(BATCH, num_text + grid[0] * grid[1])
    kwargs = {"num_text": num_text, "text_first": text_first}
    expected = neighborhood_attention(q, k, v, grid, window, stride, dilation, backend="reference", **kwargs)
    inputs = [x.to("cuda", torch.float16) for x in (q, k, v)]
    out = neighborhood_attention(*inputs, grid, window, stride, dilation, backend="natten", **kwargs)
    torch.testing.assert_close(out.double().cpu(), expected, atol=2e-2, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "tiles", "flex"])
@pytest.mark.parametrize("text_first", [True, False])
def test_a_window_covering_the_grid_is_dense_sdpa(backend, text_first):
    q, k, v = (x.float() for x in qkv(BATCH, 11 + 17 * 17))
    out = neighborhood_attention(q, k, v, (17, 17), 64, num_text=11, text_first=text_first, backend=backend)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-6, rtol=0)


def test_scale_is_passed_through():
    q, k, v = (x.float() for x in qkv(BATCH, 15 * 20))
    for backend in ("reference", "tiles", "flex"):
        out = neighborhood_attention(q, k, v, (15, 20), 20, scale=0.3, backend=backend)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=2e-6, rtol=0)


def test_flex_block_sparsity_equals_the_specs_when_windows_fall_on_tiles():
    # window 32 at stride 16 starts at 16g - 8: on 8-token tile edges, so no block is attended in part
    spec = NeighborhoodSpec((64, 64), window=32, stride=16)
    assert flex_plan(spec, torch.device("cpu")).block_density == pytest.approx(spec.flops_ratio, abs=1e-9)


# ------------------------------------------------------------------------------------------------------
# auto


def test_auto_logs_its_choice_once_per_call_shape(caplog):
    q, k, v = (x.float() for x in qkv(BATCH, 6 + 14 * 21, seed=3))
    with caplog.at_level(logging.INFO, logger="attnsurgery"):
        for _ in range(2):
            neighborhood_attention(q, k, v, (14, 21), (2, 3), num_text=6)
    records = [r.getMessage() for r in caplog.records if "neighborhood attention" in r.getMessage()]
    assert len(records) == 1 and "backend flex" in records[0] and "natten (preferred on CUDA" in records[0]


def test_auto_falls_back_to_tiles_where_flex_cannot_run_or_the_window_covers_the_grid():
    q64 = torch.zeros(1, 2, 20, 8, dtype=torch.float64)
    assert choose_backend(q64, NeighborhoodSpec((4, 5), window=3)) == "tiles"
    assert choose_backend(q64.float(), NeighborhoodSpec((4, 5), window=(4, 5))) == "tiles"
    assert choose_backend(q64.float(), NeighborhoodSpec((4, 5), window=3)) == "flex"


# ------------------------------------------------------------------------------------------------------
# bad input

GOOD = {"grid": (8, 8), "window": 4, "num_text": 2}
BAD_SPECS = [
    ({"window": 0}, r"window \(0, 0\) must be >= 1"),
    ({"window": (4, -1)}, r"window \(4, -1\) must be >= 1"),
    ({"stride": 0}, r"stride \(0, 0\) must be >= 1"),
    ({"dilation": (1, 0)}, r"dilation \(1, 0\) must be >= 1"),
    ({"grid": (0, 8)}, r"grid \(0, 8\) must be >= 1"),
    ({"stride": (2, 5)}, r"stride 5 exceeds window 4 on the cols axis; use a stride <= 4"),
    ({"dilation": 3}, r"dilation 3 x window 4 = 12 positions exceed the rows side 8.*dilation <= 2 or window <= 2"),
    ({"window": (4, 4, 4)}, r"window must be an int or a \(rows, cols\) pair of ints, got \(4, 4, 4\)"),
    ({"window": 2.5}, r"window must be an int or a \(rows, cols\) pair"),
    ({"num_text": -1}, r"num_text -1 must be >= 0"),
]


@pytest.mark.parametrize("change,message", BAD_SPECS)
def test_bad_specs_raise_one_line_value_errors(change, message):
    with pytest.raises(ValueError, match=message) as error:
        NeighborhoodSpec(**{**GOOD, **change})
    assert "\n" not in str(error.value)


def test_bad_calls_raise_one_line_errors_naming_the_value_and_the_fix():
    q, k, v = (x.float() for x in qkv(2, 2 + 64))
    good = {"grid": (8, 8), "window": 4, "num_text": 2}
    cases = [
        ((q[0], k, v), good, ValueError, r"q has shape \(2, 66, 8\); pass \[batch, heads, tokens, head_dim\]"),
        ((q, k[:, :1], v), good, ValueError, r"must share batch, heads and tokens"),
        ((q, k, v), {**good, "num_text": 3}, ValueError, r"got 66 tokens but num_text 3 \+ grid 8x8 = 67"),
        ((q, k, v), {**good, "grid": (8, 7)}, ValueError, r"got 66 tokens but num_text 2 \+ grid 8x7 = 58"),
        ((q, k, v), {**good, "backend": "fast"}, ValueError, r"backend 'fast' is not one of 'auto', 'natten'"),
        (
            (q, k, v),
            {**good, "text_key_mask": torch.ones(2, 3, dtype=torch.bool)},
            ValueError,
            r"text_key_mask is torch.bool \(2, 3\); pass a bool \[batch, num_text\] = \[2, 2\]",
        ),
        ((q, k, v), {**good, "text_key_mask": torch.ones(2, 2)}, ValueError, r"text_key_mask is torch.float32"),
        ((q.double(), k.double(), v.double()), {**good, "backend": "flex"}, ValueError, r"got torch.float64.*'tiles'"),
    ]
    if not torch.cuda.is_available():
        cases.append(((q, k, v), {**good, "backend": "natten"}, RuntimeError, r"natten|CUDA"))
    for args, kwargs, kind, message in cases:
        with pytest.raises(kind, match=message) as error:
            neighborhood_attention(*args, **kwargs)
        assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------------
# the benchmark


@pytest.mark.slow
def test_the_benchmark_runs_every_row_with_tiny_shapes():
    """``benchmarks/bench_neighborhood.py --smoke``: dense SDPA and every backend that can run, in seconds."""
    output = run_benchmark("bench_neighborhood.py", "--smoke")
    rows = [line.split(" | ") for line in output.splitlines() if line.startswith("| 24x24")]
    assert rows[0][2] == "dense SDPA"
    timed = {(row[1], row[2]) for row in rows if row[3].strip()}
    settings = {f"window {w} stride {s}" for w in (8, 12) for s in (1, 4)}
    assert timed >= {(setting, backend) for setting in settings for backend in ("flex", "tiles", "reference")}
    flex_rows = [row for row in rows if row[2] == "flex"]
    assert all("block density" in row[-1] and row[-2].endswith("x") for row in flex_rows)
