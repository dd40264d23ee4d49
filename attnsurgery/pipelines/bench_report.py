"""What a benchmark run measured: per-row results, ratios against the plain row, a table and a JSON record.

Kept apart from the timing (``bench.py``) so the command line, the GPU suite and anyone reading a saved JSON
compute the ratios the same way.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Spread", "RowResult", "BenchReport", "format_table"]

MIB = 2**20


@dataclass(frozen=True)
class Spread:
    """Median and range of repeated measurements, in seconds."""

    median: float
    low: float
    high: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values), tuple(values))

    @property
    def relative(self) -> float:
        """Half the range over the median: 0.03 reads as +-3%."""
        return (self.high - self.low) / 2 / self.median if self.median else 0.0


@dataclass(frozen=True)
class RowResult:
    """One configuration's numbers; ``skipped`` says why a row has none (not built, time budget, an error).

    ``step_s`` is the denoiser time per denoising step (every denoiser call of the step: CFG rows, FLUX's
    second pass, a sequential PAG pass), ``image_s`` the whole pipeline call, ``peak_bytes`` the CUDA
    allocator's peak during the denoising loop and ``peak_image_bytes`` during the whole call (None on the
    CPU). ``compile_s`` is how much longer the warm-up calls took than timed calls (compiled rows only).
    """

    label: str
    plain: bool
    compile: bool = False
    plugins: tuple[dict[str, Any], ...] = ()
    steps: int | None = None
    step_s: Spread | None = None
    image_s: Spread | None = None
    peak_bytes: int | None = None
    peak_image_bytes: int | None = None
    warmup_s: float | None = None
    compile_s: float | None = None
    graph_breaks: int | None = None
    skipped: str | None = None


@dataclass(frozen=True)
class BenchReport:
    """A benchmark run: the settings and machine, and one result per row."""

    model: str
    height: int
    width: int
    steps: int
    repeats: int
    warmup: int
    device: str
    device_name: str
    dtype: str
    date: str
    versions: dict[str, str]
    rows: tuple[RowResult, ...] = field(default_factory=tuple)

    def baseline(self, row: RowResult) -> RowResult | None:
        """The measured plain row with the same compile setting."""
        return next((r for r in self.rows if r.plain and r.compile == row.compile and r.step_s), None)

    def ratios(self, row: RowResult) -> dict[str, float | None]:
        """Speed-ups against plain (plain's median time over this row's: 2.0 is twice as fast) and the
        memory ratio (this row's peak over plain's)."""
        base = self.baseline(row)

        def speedup(name: str) -> float | None:
            ours, theirs = getattr(row, name), base and getattr(base, name)
            return theirs.median / ours.median if ours and theirs and ours.median else None

        memory = row.peak_bytes / base.peak_bytes if base and row.peak_bytes and base.peak_bytes else None
        return {"step_speedup": speedup("step_s"), "image_speedup": speedup("image_s"), "memory_ratio": memory}

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: settings, machine, and every row with its ratios."""
        data = asdict(self)
        data["rows"] = [{**asdict(row), **self.ratios(row)} for row in self.rows]
        return data


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _cells(report: BenchReport, row: RowResult, compiled: bool) -> list[str]:
    ratios = report.ratios(row)
    if row.step_s is None or row.image_s is None:
        cells = [row.label, "-", "-", "-", "-", "-", "-"]
    else:
        peak = "n/a" if row.peak_bytes is None else f"{row.peak_bytes / MIB:,.0f}"
        memory = "n/a" if row.peak_bytes is None else _ratio(ratios["memory_ratio"])
        cells = [
            row.label,
            f"{row.step_s.median * 1e3:,.1f} ±{row.step_s.relative:.0%}",
            _ratio(ratios["step_speedup"]),
            f"{row.image_s.median:,.3f}",
            _ratio(ratios["image_speedup"]),
            peak,
            memory,
        ]
    if compiled:
        compile_s = "-" if row.compile_s is None else f"{row.compile_s:,.1f}"
        cells[1:1] = ["yes" if row.compile else "no"]
        cells.append(compile_s)
    return [*cells, _note(row.skipped)]


def _note(reason: str | None, width: int = 100) -> str:
    """A reason on one short line (an error's first line; the JSON keeps it whole)."""
    line = (reason or "").strip().splitlines()[0] if reason and reason.strip() else ""
    return line if len(line) <= width else line[: width - 3] + "..."


def format_table(report: BenchReport, markdown: bool = False) -> str:
    """The rows as an aligned text table (or Markdown), after a line naming the model, settings and machine."""
    compiled = any(row.compile for row in report.rows)
    header = ["config", "step ms", "speed-up", "image s", "speed-up", "peak MiB", "x plain"]
    if compiled:
        header[1:1] = ["compile"]
        header.append("compile s")
    header.append("note")
    body = [_cells(report, row, compiled) for row in report.rows]
    title = (
        f"{report.model}: {report.width}x{report.height} px, {_count(report.steps, 'step')}, {report.dtype} on "
        f"{report.device_name}; median of {_count(report.repeats, 'image')} after {report.warmup} warm-up, "
        f"{report.date}"
    )
    if markdown:
        lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
        lines += [f"| {' | '.join(cells)} |" for cells in body]
        return "\n".join([f"**{title}**", "", *lines])
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip() for cells in [header, *body]]
    return "\n".join([title, *lines])
