"""Timing plugins on one pipeline: denoiser time per step, image time and peak memory, plain vs each row.

``benchmark`` serves both ``attnsurgery bench`` and ``benchmarks/gpu_suite.py``, so the two never disagree.
Every row runs on the same pipeline in one process: ``warmup`` untimed pipeline calls (lazy initialisation,
allocator growth, compilation), then ``repeats`` timed calls, whose median and range are reported. The
denoiser is timed from hooks on its outermost call, with CUDA events on a GPU (no synchronisation inside the
loop) and ``time.perf_counter`` on the CPU. Peak memory is the CUDA allocator's; on the CPU it is not
reported, since neither the RSS nor the heap gives a peak per call without slowing every op down.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..plugins.base import Plugin
from ..surgery import patched, resolve_target
from .bench_report import BenchReport, RowResult, Spread
from .loading import parse_dtype
from .model_shapes import prompt_inputs

__all__ = ["BenchRow", "BenchError", "benchmark", "check_rows", "bench_device", "bench_dtype", "device_name"]


@dataclass(frozen=True)
class BenchRow:
    """One configuration to time.

    Args:
        label: the row's name in the table.
        plugins: attnsurgery plugins, applied with ``surg.patched`` around the row.
        setup: instead of plugins, ``pipe -> context manager`` yielding the pipeline to call (a peer package
            patching ``pipe``, another pipeline class sharing its components).
        compile: wrap the denoiser with ``torch.compile`` after the plugins are applied.
        skip: list the row without measuring it, for this reason (e.g. ``"not built"``).
    """

    label: str
    plugins: tuple[Plugin, ...] = ()
    setup: Callable[[Any], AbstractContextManager[Any]] | None = None
    compile: bool = False
    skip: str | None = None

    @property
    def plain(self) -> bool:
        return not self.plugins and self.setup is None and self.skip is None


class BenchError(ValueError):
    """A row that cannot be measured; the message names the row and carries the original error."""


def bench_device(device: str | torch.device | None = None) -> torch.device:
    """The device to benchmark on (default: CUDA when available, else the CPU), refusing one that is missing."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device {str(device)!r}: benchmarks run on cuda or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "was built without CUDA" if torch.version.cuda is None else "sees no CUDA GPU"
        raise ValueError(
            f"device {str(device)!r}: torch {torch.__version__} {why}; use the cpu device "
            "(--device cpu), or run on a machine with a GPU"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def bench_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype to benchmark in (default: bf16 on CUDA, fp32 on the CPU).

    fp16 on the CPU is refused: many CPU kernels have no half-precision path and the rest are emulated, so its
    timings would measure the emulation, not the plugin.
    """
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    parsed = parse_dtype(dtype)
    if device.type == "cpu" and parsed == torch.float16:
        raise ValueError(
            "fp16 on the CPU is emulated or missing for many ops and would time the emulation; "
            "use bf16 or fp32 on the CPU (fp16 on CUDA)"
        )
    if device.type == "cuda" and parsed == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{torch.cuda.get_device_name(device)} has no bf16 support; use fp16 or fp32")
    return parsed


def device_name(device: torch.device) -> str:
    """The machine, as a table should name it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({os.cpu_count()} cores, {threads} thread{'' if threads == 1 else 's'})"


class _Probe:
    """Times the outermost calls of the denoiser during one pipeline call and reads the CUDA peak."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.handles = [
            module.register_forward_pre_hook(self._pre, prepend=True),
            module.register_forward_hook(self._post, always_call=True),
        ]
        self.start_run()

    def start_run(self) -> None:
        self.depth, self.spans, self.start = 0, [], None
        self.peak = self.peak_before = None

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))  # the denoiser's device, not the current one
        return event

    def _pre(self, module: torch.nn.Module, args: tuple) -> None:
        if self.depth == 0:
            if self.cuda and not self.spans:  # the loop starts: the text encoders' peak is behind us
                self.peak_before = torch.cuda.max_memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            self.start = self._mark()
        self.depth += 1

    def _post(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.spans.append((self.start, self._mark()))
            if self.cuda:  # the allocator's counter is kept on the host: reading it does not synchronise
                self.peak = torch.cuda.max_memory_allocated(self.device)

    def denoiser_seconds(self) -> float:
        if not self.cuda:
            return sum(end - start for start, end in self.spans)
        torch.cuda.synchronize(self.device)
        return sum(start.elapsed_time(end) for start, end in self.spans) / 1e3

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass(frozen=True)
class _Run:
    image_s: float
    denoiser_s: float
    peak: int | None
    peak_image: int | None


def _timed_call(call: Callable[[], Any], probe: _Probe) -> _Run:
    probe.start_run()
    if probe.cuda:
        torch.cuda.synchronize(probe.device)
        torch.cuda.reset_peak_memory_stats(probe.device)
    start = time.perf_counter()
    call()
    if probe.cuda:
        torch.cuda.synchronize(probe.device)
    image_s = time.perf_counter() - start
    peak_image = None
    if probe.cuda:
        peak_image = max(probe.peak_before or 0, torch.cuda.max_memory_allocated(probe.device))
    return _Run(image_s, probe.denoiser_seconds(), probe.peak, peak_image)


def _seeded() -> torch.Generator:
    """The same starting noise for every call of every row."""
    return torch.Generator("cpu").manual_seed(0)


def _role(pipe: Any) -> tuple[str, torch.nn.Module]:
    """The pipeline attribute holding the denoiser, and the denoiser."""
    _, denoiser = resolve_target(pipe)
    return ("unet" if getattr(pipe, "unet", None) is denoiser else "transformer"), denoiser


@contextlib.contextmanager
def _prepared(pipe: Any, row: BenchRow) -> Iterator[Any]:
    """The pipeline to call for ``row``, with its plugins or setup in place for the duration."""
    if row.setup is not None:
        with row.setup(pipe) as target:
            yield target
    elif row.plugins:
        with patched(pipe, *row.plugins):
            yield pipe
    else:
        yield pipe


@contextlib.contextmanager
def _compiled(pipe: Any, enabled: bool, backend: str) -> Iterator[torch.nn.Module]:
    """The module whose calls are timed: the denoiser, or ``torch.compile`` of it (plugins already in place)
    swapped into the pipeline for the row. Each compiled row starts from empty dynamo caches, so its compile
    time is its own and earlier rows do not use up the recompile limit."""
    role, denoiser = _role(pipe)
    if not enabled:
        yield denoiser
        return
    torch._dynamo.reset()
    compiled = torch.compile(denoiser, backend=backend)
    setattr(pipe, role, compiled)
    try:
        yield compiled
    finally:
        setattr(pipe, role, denoiser)


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _plugin_records(plugins: Sequence[Plugin]) -> tuple[dict[str, Any], ...]:
    records = []
    for plugin in plugins:
        try:
            records.append(plugin.to_dict())
        except ValueError:  # e.g. ConvFusion blocks that live only in memory
            records.append({"type": type(plugin).__name__})
    return tuple(records)


@dataclass(frozen=True)
class _Settings:
    device: torch.device
    call: dict[str, Any]
    steps: int
    repeats: int
    warmup: int
    backend: str


def _measure(pipe: Any, row: BenchRow, settings: _Settings, advance: Callable[[], None]) -> RowResult:
    runs = []
    with _prepared(pipe, row) as target, _compiled(target, row.compile, settings.backend) as outer:
        if hasattr(target, "set_progress_bar_config"):
            target.set_progress_bar_config(disable=True)
        probe = _Probe(outer, settings.device)
        breaks = _graph_breaks() if row.compile else 0
        try:
            for _ in range(settings.warmup + settings.repeats):
                runs.append(_timed_call(lambda: target(**settings.call, generator=_seeded()), probe))
                advance()
        finally:
            probe.remove()
        breaks = _graph_breaks() - breaks if row.compile else None
        timesteps = getattr(getattr(target, "scheduler", None), "timesteps", None)
    steps = len(timesteps) if timesteps is not None else settings.steps  # PNDM runs steps + 1
    warm, timed = runs[: settings.warmup], runs[settings.warmup :]
    image_s = Spread.of([run.image_s for run in timed])
    warmup_s = sum(run.image_s for run in warm) if warm else None
    return RowResult(
        label=row.label,
        plain=row.plain,
        compile=row.compile,
        plugins=_plugin_records(row.plugins),
        steps=steps,
        step_s=Spread.of([run.denoiser_s / steps for run in timed]),
        image_s=image_s,
        peak_bytes=max((run.peak for run in timed if run.peak is not None), default=None),
        peak_image_bytes=max((run.peak_image for run in timed if run.peak_image is not None), default=None),
        warmup_s=warmup_s,
        compile_s=warmup_s - len(warm) * image_s.median if row.compile and warm else None,
        graph_breaks=breaks,
    )


def _with_plain_rows(rows: Sequence[BenchRow]) -> list[BenchRow]:
    """The rows, after a plain row for every compile setting that lacks one (the ratios need it)."""
    rows = list(rows)
    for compiled in dict.fromkeys(row.compile for row in rows) or [False]:
        if not any(row.plain and row.compile == compiled for row in rows):
            first = next((i for i, row in enumerate(rows) if row.compile == compiled), len(rows))
            rows.insert(first, BenchRow("plain + compile" if compiled else "plain", compile=compiled))
    return rows


def check_rows(pipe: Any, rows: Sequence[BenchRow], keep_going: bool = False) -> dict[int, str]:
    """Apply and remove every row once, before anything is timed, so that a plugin that does not support the
    model fails at once with its own message and the row's name; with ``keep_going`` the failures come back
    as row index -> reason instead."""
    failures = {}
    for index, row in enumerate(rows):
        if row.skip is not None or row.plain:
            continue
        try:
            with _prepared(pipe, row):
                pass
        except Exception as error:
            if not keep_going:
                raise BenchError(f"row {row.label!r}: {error}") from error
            failures[index] = f"failed: {type(error).__name__}: {error}"
    return failures


def _versions() -> dict[str, str]:
    import diffusers

    try:
        ours = importlib.metadata.version("attnsurgery")
    except importlib.metadata.PackageNotFoundError:
        ours = "unknown"
    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "attnsurgery": ours,
        "cuda": str(torch.version.cuda),
    }


def benchmark(
    pipe: Any,
    rows: Sequence[BenchRow],
    *,
    height: int,
    width: int,
    steps: int = 20,
    repeats: int = 3,
    warmup: int = 1,
    inputs: dict[str, Any] | None = None,
    model: str = "",
    compile_backend: str = "inductor",
    keep_going: bool = False,
    deadline: float | None = None,
    progress: bool = True,
) -> BenchReport:
    """Time every row on ``pipe`` in one run; plain rows are added where missing.

    Args:
        pipe: a diffusers text-to-image pipeline, already on its device and in its dtype.
        rows: the configurations, measured in this order.
        height, width, steps: the image size in pixels and the denoising steps of each call.
        repeats: timed calls per row (median and range reported).
        warmup: untimed calls before them (at least 1 for compiled rows: they compile there).
        inputs: pipeline-call inputs for the prompt (default ``prompt_inputs(pipe)``).
        model: the model's name in the report.
        compile_backend: ``torch.compile`` backend of compiled rows (``"eager"`` traces without codegen).
        keep_going: record a row that fails (a plugin the model does not support, out of memory, a compile
            error) in the report instead of raising.
        deadline: a ``time.perf_counter()`` value after which rows not yet started are skipped.
        progress: a progress bar over rows x calls.

    Raises:
        BenchError: a row that fails (unless ``keep_going``), naming it: e.g. a plugin for U-Nets on a DiT.

    Example:
        >>> from attnsurgery import TokenMerging
        >>> rows = [BenchRow("ToMe", (TokenMerging(0.5),))]
        >>> report = benchmark(pipe, rows, height=64, width=64, steps=2, repeats=1, progress=False)
        >>> [row.label for row in report.rows]
        ['plain', 'ToMe']
        >>> print(format_table(report))  # doctest: +SKIP
    """
    if repeats < 1 or warmup < 0 or steps < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0 and steps >= 1, got {repeats}, {warmup}, {steps}")
    rows = _with_plain_rows(rows)
    if warmup < 1 and any(row.compile for row in rows):
        raise ValueError("compiled rows compile during warm-up: use warmup >= 1")
    weight = next(_role(pipe)[1].parameters())
    device = weight.device
    call = {
        **(prompt_inputs(pipe) if inputs is None else inputs),
        "num_inference_steps": steps,
        "height": height,
        "width": width,
    }
    settings = _Settings(device, call, steps, repeats, warmup, compile_backend)
    failures = check_rows(pipe, rows, keep_going)
    results = []
    with tqdm(total=len(rows) * (warmup + repeats), desc="bench", disable=not progress) as bar:
        for index, row in enumerate(rows):
            bar.set_postfix_str(row.label)
            late = deadline is not None and time.perf_counter() > deadline
            reason = row.skip or failures.get(index) or ("skipped: time budget" if late else None)
            if reason is None:
                try:
                    results.append(_measure(pipe, row, settings, lambda: bar.update(1)))
                    continue
                except Exception as error:
                    if not keep_going:
                        raise BenchError(f"row {row.label!r}: {error}") from error
                    reason = f"failed: {type(error).__name__}: {error}"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            bar.update((index + 1) * (warmup + repeats) - bar.n)  # what this row's calls would have counted
            results.append(RowResult(row.label, row.plain, row.compile, _plugin_records(row.plugins), skipped=reason))
    return BenchReport(
        model=model,
        height=height,
        width=width,
        steps=steps,
        repeats=repeats,
        warmup=warmup,
        device=str(device),
        device_name=device_name(device),
        dtype=str(weight.dtype).removeprefix("torch."),
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        versions=_versions(),
        rows=tuple(results),
    )
