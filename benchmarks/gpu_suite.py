"""The GPU suite: every plugin against plain and against its peer package, on full-width models, in one run.

    python benchmarks/gpu_suite.py --out results/      # one CUDA GPU, bf16: under 8 minutes (see --budget-s)
    python benchmarks/gpu_suite.py --smoke --out tmp/  # CPU, the tiny test shapes: tens of seconds (CI runs it)

Writes ``gpu_suite.json`` (every report of ``attnsurgery.pipelines.bench.benchmark``, which times every row
here exactly as ``attnsurgery bench`` does) and ``gpu_suite.md`` (one table per case) into ``--out``.

Cases, all with random weights of the published widths (``attnsurgery.pipelines.model_shapes``) in bf16:
  SD1.5 and SDXL U-Nets at 1024^2 and 2048^2: plain; HiDiffusion (force=True: it acts at every size, as the
    ``hidiffusion`` package does) vs that package; ToMe 0.5 vs ``tomesd`` 0.5 (``max_downsample=2`` on SDXL, whose
    top level has no attention); agent attention; PAG on the mid block (layer level), on half its heads, and
    diffusers' PAG pipeline on the same block; ConvFusion with fresh random blocks.
  SD3.5-medium- and FLUX-dev-shaped transformers at 2048^2 and 4096^2: plain; PAG layer and heads (block 1);
    diffusers' PAG pipeline (SD3.5 only: diffusers has none for FLUX); token merging 0.5 in both modes (the
    issue's goal: >= 1.3x end to end at 2K), agent attention, neighborhood attention with its native window.
Every case runs without torch.compile first, then with it (whole denoiser, inductor, after the plugins).

Run time: the full matrix needs far more than 8 minutes (compiling a denoiser takes tens of seconds per row),
so cases run in priority order (all eager cases, the cheap ones first, then the compiled ones) and rows that
would start after ``--budget-s`` (default 390 s) are listed as "skipped: time budget". The last row started
may overrun by its own length (about a minute for FLUX at 4096^2), so a default run ends within 8 minutes on an
H100/H200; ``--budget-s 0`` runs everything. These times are estimates: the suite has not yet run on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnsurgery as surg
from attnsurgery import testing
from attnsurgery.pipelines.bench import BenchRow, bench_device, bench_dtype, benchmark
from attnsurgery.pipelines.bench_report import BenchReport, format_table
from attnsurgery.pipelines.model_shapes import random_pipeline, shape_of
from attnsurgery.surgery import resolve_target


@dataclasses.dataclass(frozen=True)
class Case:
    model: str  # a named shape
    size: int  # image side in pixels
    steps: int
    repeats: int


#: Priority order (cheap and most asked-for first); the compiled pass repeats it.
CASES = (
    Case("sd15", 1024, 4, 2),
    Case("sdxl", 1024, 4, 2),
    Case("sd35-medium", 2048, 2, 2),
    Case("flux-dev", 2048, 2, 2),
    Case("sd15", 2048, 4, 2),
    Case("sdxl", 2048, 4, 2),
    Case("sd35-medium", 4096, 1, 1),
    Case("flux-dev", 4096, 1, 1),
)
#: --smoke: the tiny test pipeline of each shape (see ``scaled`` for the sizes).
SMOKE_MODELS = {
    "sd15": testing.tiny_sd15,
    "sdxl": testing.tiny_sdxl,
    "sd35-medium": testing.tiny_sd35,
    "flux-dev": testing.tiny_flux,
}
DIFFUSERS_PAG = {
    "StableDiffusionPipeline": "StableDiffusionPAGPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLPAGPipeline",
    "StableDiffusion3Pipeline": "StableDiffusion3PAGPipeline",
}
DIT_TOKEN_ROWS = (
    BenchRow("ToMe 0.5 (qkv)", (surg.TokenMerging(ratio=0.5),)),
    BenchRow("ToMe 0.5 (kv)", (surg.TokenMerging(ratio=0.5, mode="kv"),)),
    BenchRow("AgentAttention", (surg.AgentAttention(),)),
    BenchRow("NeighborhoodAttention (native window)", (surg.NeighborhoodAttention(),)),
)
DIT_PAG_REGEX = r"transformer_blocks\.1\.attn$"  # diffusers matches pag_applied_layers with re.search
SHIFT = 1  # the shift index the hidiffusion package is pinned to (its draws use the global RNG)


# ------------------------------------------------------------------------------------------ peers
def _hidiffusion_peer() -> Any:
    """The test suite's adapter for the ``hidiffusion`` package (tests/support/hidiffusion_peer.py)."""
    return importlib.import_module("tests.support.hidiffusion_peer")


@contextlib.contextmanager
def hidiffusion_package(pipe: Any) -> Iterator[Any]:
    family = surg.detect_family(pipe.unet).name
    with _hidiffusion_peer().package_applied(pipe, family, raunet=True, window_attn=True, shifts=[SHIFT] * 100_000):
        yield pipe


@contextlib.contextmanager
def tomesd_patch(pipe: Any, max_downsample: int) -> Iterator[Any]:
    import tomesd

    tomesd.apply_patch(pipe, ratio=0.5, max_downsample=max_downsample)
    try:
        yield pipe
    finally:
        tomesd.remove_patch(pipe)


@contextlib.contextmanager
def diffusers_pag(pipe: Any, layers: str) -> Iterator[Any]:
    """diffusers' PAG pipeline on ``pipe``'s components. It swaps its processors in and out around each call, but
    not on an error, so they are put back here: a failed row must not leave them to the next rows."""
    import diffusers

    cls = getattr(diffusers, DIFFUSERS_PAG[type(pipe).__name__])
    accepted = inspect.signature(cls).parameters
    components = {name: value for name, value in pipe.components.items() if name in accepted}
    extra = {"requires_safety_checker": False} if "requires_safety_checker" in accepted else {}
    denoiser = resolve_target(pipe)[1]
    processors = dict(denoiser.attn_processors)
    try:
        yield cls(**components, **extra, pag_applied_layers=[layers])
    finally:
        denoiser.set_attn_processor(processors)


def _setup(factory: Callable[..., Any], *args: Any) -> Callable[[Any], Any]:
    return lambda pipe: factory(pipe, *args)


# ------------------------------------------------------------------------------------------ rows
def half_heads(pipe: Any, layers: str) -> list[str]:
    """Every second head of the PAG layers."""
    info = surg.describe(resolve_target(pipe)[1], pipe.vae_scale_factor)
    selected = info.select(layers, kinds=("self", "joint", "single"))
    return [f"{layer.path}:{head}" for layer in selected for head in range(0, layer.heads, 2)]


def rows_for(pipe: Any) -> list[BenchRow]:
    """The suite's rows for one model. PAG acts on the mid block of a U-Net and on the joint attention of
    block 1 of a DiT (SD3.5's image-only attn2 there is left out: diffusers' PAG processors fail on it)."""
    unet = hasattr(pipe, "unet")
    layers = "mid" if unet else "transformer_blocks.1.attn"
    heads = half_heads(pipe, layers)
    pag = [
        BenchRow("PAG layers", (surg.PerturbedAttention(scale=3.0, layers=layers),)),
        BenchRow(f"PAG heads ({len(heads)})", (surg.PerturbedAttention(scale=3.0, heads=heads),)),
    ]
    if type(pipe).__name__ in DIFFUSERS_PAG:
        pag.append(BenchRow("diffusers PAG pipeline", setup=_setup(diffusers_pag, "mid" if unet else DIT_PAG_REGEX)))
    else:
        pag.append(BenchRow("diffusers PAG pipeline", skip="diffusers has no PAG pipeline for FLUX"))
    if not unet:
        return [BenchRow("plain"), *pag, *DIT_TOKEN_ROWS]
    sdxl = surg.detect_family(pipe.unet).name == "sdxl"
    return [
        BenchRow("plain"),
        BenchRow("HiDiffusion (force)", (surg.HiDiffusion(force=True),)),
        BenchRow("hidiffusion package", setup=hidiffusion_package),
        BenchRow("ToMe 0.5", (surg.TokenMerging(ratio=0.5),)),
        BenchRow("tomesd 0.5", setup=_setup(tomesd_patch, 2 if sdxl else 1)),
        BenchRow("AgentAttention", (surg.AgentAttention(),)),
        *pag,
        BenchRow("ConvFusion (random blocks)", (surg.ConvFusion(),)),
    ]


def compiled(rows: list[BenchRow]) -> list[BenchRow]:
    return [dataclasses.replace(row, label=f"{row.label} + compile", compile=True) for row in rows if not row.skip]


# ------------------------------------------------------------------------------------------ run
def build(model: str, smoke: bool, dtype: torch.dtype, device: torch.device) -> Any:
    """A random-weight pipeline: the published shape, or with --smoke the tiny test pipeline's shape."""
    return random_pipeline(shape_of(SMOKE_MODELS[model]()) if smoke else model, dtype=dtype, device=device)


def scaled(case: Case, smoke: bool) -> Case:
    """The case as run: itself, or with --smoke its tiny counterpart (at most two steps, one timed image)."""
    if not smoke:
        return case
    divisor = 16 if case.model in ("sd15", "sdxl") else 32
    return dataclasses.replace(case, size=case.size // divisor, steps=min(case.steps, 2), repeats=1)


def run_suite(args: argparse.Namespace) -> list[tuple[str, BenchReport]]:
    device = bench_device("cpu" if args.smoke else "cuda")
    dtype = bench_dtype("fp32" if args.smoke else "bf16", device)
    deadline = time.perf_counter() + args.budget_s if args.budget_s > 0 else None
    pipes: dict[str, Any] = {}
    reports: dict[str, BenchReport] = {}
    for compile_pass in (False, True):
        for index, case in enumerate(CASES):
            if compile_pass and args.smoke and index > 0:
                continue  # --smoke traces only the first case's plain row (backend eager): seconds, not minutes
            if case.model not in pipes:
                pipes[case.model] = build(case.model, args.smoke, dtype, device)
            pipe = pipes[case.model]
            rows = rows_for(pipe)
            if compile_pass:
                rows = compiled(rows[:1] if args.smoke else rows)
            run = scaled(case, args.smoke)
            name = f"{case.model} {case.size}^2" + (f" (smoke: {run.size}^2)" if args.smoke else "")
            report = benchmark(
                pipe,
                rows,
                height=run.size,
                width=run.size,
                steps=run.steps,
                repeats=run.repeats,
                model=name,
                keep_going=True,
                deadline=deadline,
                compile_backend="eager" if args.smoke else "inductor",
                progress=not args.no_progress,
            )
            earlier = reports.get(name)
            reports[name] = dataclasses.replace(earlier, rows=earlier.rows + report.rows) if earlier else report
    return list(reports.items())


def write(reports: list[tuple[str, BenchReport]], out: Path, elapsed: float, args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "smoke": args.smoke,
        "budget_s": args.budget_s,
        "elapsed_s": round(elapsed, 1),
        "cases": [report.to_dict() for _, report in reports],
    }
    (out / "gpu_suite.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = f"# attnsurgery GPU suite{' (smoke)' if args.smoke else ''}\n\n{elapsed:.0f} s in all."
    tables = [format_table(report, markdown=True) for _, report in reports]
    (out / "gpu_suite.md").write_text("\n\n".join([title, *tables]) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-suite"), help="folder for gpu_suite.json and .md")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the suite, measures nothing")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=390.0,
        help="start no row after this many seconds (default 390: the run ends within 8 minutes); 0: run every row",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit(
            "gpu_suite.py needs a CUDA GPU and torch.cuda.is_available() is False here; "
            "--smoke runs the same code on the CPU with tiny shapes"
        )
    if args.smoke:
        torch.set_num_threads(1)  # tiny models on a shared CPU: one thread is fastest
    start = time.perf_counter()
    reports = run_suite(args)
    write(reports, args.out, time.perf_counter() - start, args)
    print("\n\n".join(format_table(report) for _, report in reports))
    print(f"\nwrote {args.out / 'gpu_suite.json'} and {args.out / 'gpu_suite.md'}")


if __name__ == "__main__":
    main()
