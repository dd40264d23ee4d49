"""Offline helpers for testing attnsurgery and plugins written on it: tiny random-weight pipelines of the
real architectures, and the exact-restore check.

Example:
    >>> from attnsurgery.testing import assert_restored, snapshot, tiny_sd15
    >>> pipe = tiny_sd15()
    >>> before = snapshot(pipe)
    >>> assert_restored(pipe, before)
"""

from .restore import PipelineState, assert_restored, snapshot
from .tiny import (
    byte_clip_tokenizer,
    tiny_chroma,
    tiny_flux,
    tiny_flux2,
    tiny_qwenimage,
    tiny_sd3,
    tiny_sd15,
    tiny_sd35,
    tiny_sdxl,
    tiny_t5_tokenizer,
    tiny_zimage,
)

__all__ = [
    "tiny_sd15",
    "tiny_sdxl",
    "tiny_sd3",
    "tiny_sd35",
    "tiny_flux",
    "tiny_flux2",
    "tiny_qwenimage",
    "tiny_zimage",
    "tiny_chroma",
    "byte_clip_tokenizer",
    "tiny_t5_tokenizer",
    "PipelineState",
    "snapshot",
    "assert_restored",
]
