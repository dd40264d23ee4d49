"""HeadHunter: greedy search for the attention heads whose perturbation serves an objective."""

from ..perturbation.headset import HeadSet
from .api import HuntPreset, HuntResult, Racing, head_grid, hunt, preset_for, report_table
from .objectives import AestheticScore, ClipScore, ReferenceScore, make_objective

__all__ = [
    "AestheticScore",
    "ClipScore",
    "HeadSet",
    "HuntPreset",
    "HuntResult",
    "Racing",
    "ReferenceScore",
    "head_grid",
    "hunt",
    "make_objective",
    "preset_for",
    "report_table",
]
