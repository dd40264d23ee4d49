"""Plain versus plugins on the reference world: one run of the evaluator per (setup, size), closeness to plain.

``attnsurgery eval`` and the technique cards (``benchmarks/reference_cards.py``) both compare setups this
way: the same held-out pairs and seeds for every setup, so a row's PSNR/SSIM to the plain row of its size
is the image change the plugin makes, beside the change in fidelity and duplication.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..plugins.base import Plugin
from ..reference.closeness import mean_closeness
from ..reference.eval import EvalReport, Generate, evaluate
from ..surgery import patched

__all__ = ["Setup", "ComparisonRow", "compare_setups", "markdown_table"]

#: A row label and the plugins it applies (none: the plain pipeline).
Setup = tuple[str, Sequence[Plugin]]


@dataclass(frozen=True)
class ComparisonRow:
    """One setup at one size: its report, and its closeness and time against plain at that size."""

    setup: str
    report: EvalReport
    psnr: float | None  # None on the plain rows themselves
    ssim: float | None
    time_ratio: float

    @property
    def size(self) -> int:
        return self.report.size


def compare_setups(
    pipe: Any,
    generate: Generate,
    setups: Sequence[Setup],
    pairs: Sequence[tuple[str, int]],
    sizes: Sequence[int],
    batch_size: int = 16,
    progress: bool = False,
) -> list[ComparisonRow]:
    """Evaluate every setup at every size on ``pairs``; plain (no plugins) always runs first per size.

    Args:
        pipe: the pipeline ``generate`` samples from (plugins are applied to it, then removed).
        generate: e.g. ``pipeline_sampler(pipe, steps, guidance)``.
        setups: (label, plugins) rows; a plain row is added in front when none is given.
        pairs: held-out (prompt, seed) pairs, the same for every row.
        sizes: image sides in pixels.
        batch_size: pairs per generate call.
        progress: progress bars per evaluation.
    """
    if not any(not plugins for _, plugins in setups):
        setups = [("plain", ()), *setups]
    setups = sorted(setups, key=lambda setup: bool(setup[1]))  # plain first, the others in their order
    rows: list[ComparisonRow] = []
    plain: dict[int, EvalReport] = {}
    for label, plugins in setups:
        for size in sizes:
            with patched(pipe, *plugins):
                report = evaluate(generate, pairs, size, batch_size=batch_size, progress=progress, keep_images=True)
            base = plain.setdefault(size, report)
            psnr, ssim = (None, None) if base is report else mean_closeness(report.images, base.images)
            rows.append(ComparisonRow(label, report, psnr, ssim, report.seconds_per_image / base.seconds_per_image))
    return rows


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[ComparisonRow]) -> str:
    """The rows as a markdown table (fidelity, duplication, extra objects, clean shapes, closeness, time)."""
    lines = [
        "| setup | px | fidelity | duplication | extra objects | clean shapes | PSNR dB | SSIM | s/image "
        "| time vs plain |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        m = row.report.metrics
        lines.append(
            f"| {row.setup} | {row.size} | {m.fidelity:.3f} | {m.duplication_rate:.3f} | {m.mean_extra_objects:.2f} | "
            f"{m.clean_shape_rate:.3f} | {_number(row.psnr, 2)} | {_number(row.ssim, 3)} | "
            f"{row.report.seconds_per_image:.2f} | {row.time_ratio:.2f}x |"
        )
    return "\n".join(lines)
