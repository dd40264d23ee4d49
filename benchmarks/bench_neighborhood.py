"""Speed of neighbourhood attention against dense SDPA at FLUX.1's joint-attention shape, in one run.

One attention call of FLUX.1 (24 heads x 128, 512 text tokens first, image tokens row-major) on a 128 x 128
image grid (2K px; 256 x 256, 4K, on CUDA), for windows 64 x 64 and 80 x 80 at stride 1 and 16: dense SDPA
over the joint sequence, then each backend that can run. Beside each time ratio: the FLOP ratio (dense
attended pairs over ours, the speed-up the sparsity allows), and for flex the block density its BlockMask
reaches (``spec.flops_ratio`` is the ideal) and the token reordering (into tiles and back) timed apart: the
flex row is the kernel on already tile-ordered tensors, "with reorder" adds the permutation. Compilation
and BlockMask building happen in the warm-up and are not timed; ``reference`` runs only where its full score
matrix fits in ``--reference-gb``.

Usage:
    python benchmarks/bench_neighborhood.py                   # 2K on CPU (4K on CUDA), FLUX.1 shape
    python benchmarks/bench_neighborhood.py --heads 6 --grid 64
    python benchmarks/bench_neighborhood.py --smoke           # tiny shapes, seconds: every row runs
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from attnsurgery.ops.neighborhood import BACKENDS, neighborhood_attention
from attnsurgery.ops.neighborhood_backends import flex
from attnsurgery.ops.neighborhood_spec import NeighborhoodSpec

HEAD_DIM, TEXT = 128, 512
"""FLUX.1's joint attention: 24 heads of 128, 512 T5 tokens."""


@dataclass(frozen=True)
class Row:
    case: str
    setting: str
    variant: str
    seconds: float | None
    flops_ratio: float
    note: str = ""
    with_reorder: float | None = None


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn`` in seconds, synchronising CUDA around each call."""

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        once()
    return statistics.median(once() for _ in range(repeats))


def round_trip(x: torch.Tensor, plan: flex.FlexPlan) -> list[torch.Tensor]:
    """The reordering flex adds around its kernel: q, k and v into tile order, the output back."""
    return [flex.reorder(x, plan) for _ in range(3)] + [flex.restore(x, plan)]


def measure_case(q: torch.Tensor, spec: NeighborhoodSpec, args: argparse.Namespace, case: str) -> list[Row]:
    """Every backend on one spec (self-attention of ``q``); the flex row split into kernel and reordering."""
    device, ratio = q.device, spec.flops_ratio
    setting = f"window {spec.window[0]} stride {spec.stride[0]}"
    call = {"grid": spec.grid, "window": spec.window, "stride": spec.stride, "num_text": spec.num_text}
    rows = []
    for name, module in BACKENDS.items():
        reason = module.check(q, spec, None)
        if reason is None and name == "reference":
            gigabytes = q.shape[0] * q.shape[1] * spec.num_tokens**2 * 4 / 2**30
            if gigabytes > args.reference_gb:
                reason = f"its {gigabytes:.0f} GB score matrix exceeds --reference-gb {args.reference_gb}"
        if reason is not None:
            rows.append(Row(case, setting, name, None, ratio, f"not run: {reason}"))
        elif name == "flex":
            plan = flex.flex_plan(spec, device)
            ordered = flex.reorder(q, plan)
            seconds = timed(partial(flex.attend_tiled, ordered, ordered, ordered, plan), device, args.repeats, 1)
            reorder = timed(partial(round_trip, q, plan), device, 3, 1)
            note = f"block density {plan.block_density:.3f} (ideal {ratio:.3f})"
            rows.append(Row(case, setting, name, seconds, ratio, note, with_reorder=seconds + reorder))
        else:
            run = partial(neighborhood_attention, q, q, q, **call, backend=name)
            rows.append(Row(case, setting, name, timed(run, device, args.repeats, 1), ratio))
    return rows


def table(rows: list[Row], dense: dict[str, float]) -> str:
    """Markdown: time, speed-up against the same run's dense SDPA, and the FLOP bound beside it."""
    lines = [
        "| case | setting | variant | time (s) | speed-up vs dense | FLOP ratio (dense / ours) | with reorder | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        base = dense[row.case]
        head = f"| {row.case} | {row.setting} | {row.variant} |"
        if row.seconds is None:
            lines.append(f"{head} | | {1 / row.flops_ratio:.2f}x | | {row.note} |")
            continue
        reorder = "" if row.with_reorder is None else f"{base / row.with_reorder:.2f}x"
        speed = f"{base / row.seconds:.2f}x | {1 / row.flops_ratio:.2f}x"
        lines.append(f"{head} {row.seconds:.3f} | {speed} | {reorder} | {row.note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, nargs="+", help="image grid sides (default 128 on CPU, 128 256 on CUDA)")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--windows", type=int, nargs="+", default=[64, 80])
    parser.add_argument("--strides", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per row after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 gives steadier numbers)")
    parser.add_argument("--reference-gb", type=float, default=2.0, help="run the reference below this score size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: grid 24, 2 heads, windows 8 and 12")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.smoke:
        args.grid, args.heads, args.windows, args.strides = [24], 2, [8, 12], [1, 4]
    grids = args.grid or ([128, 256] if device.type == "cuda" else [128])
    text = 16 if args.smoke else TEXT
    head_dim = 16 if args.smoke else HEAD_DIM
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows: list[Row] = []
    dense: dict[str, float] = {}
    with torch.inference_mode():
        for side in grids:
            base = f"{side}x{side} + {text} text"
            q = torch.randn(1, args.heads, text + side * side, head_dim, device=device, dtype=dtype)
            dense[base] = timed(partial(F.scaled_dot_product_attention, q, q, q), device, args.repeats, 1)
            rows.append(Row(base, "", "dense SDPA", dense[base], 1.0))
            print(f"{base} | dense SDPA | {dense[base]:.3f} s", flush=True)
            for window in args.windows:
                for stride in args.strides:
                    spec = NeighborhoodSpec((side, side), window, stride, num_text=text)
                    for row in measure_case(q, spec, args, base):
                        rows.append(row)
                        print(f"{base} | {row.setting} | {row.variant} | {row.seconds} | {row.note}", flush=True)
    print(f"\ntorch {torch.__version__}, {device}, {dtype}, {args.threads} threads, {args.heads} heads x {head_dim}")
    print(table(rows, dense))


if __name__ == "__main__":
    main()
