"""Test set-up: offline hub, few threads, and fixtures for the tiny pipelines (helpers live in tests/support/)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# Tiny models run many small ops: one thread is as fast on an idle machine and ~100x faster on a busy one
# (two threads per process spin-wait for each other when other processes hold the cores).
torch.set_num_threads(1)

from attnsurgery.testing import tiny  # noqa: E402


def _pipeline_fixture(builder):
    """A fresh tiny pipeline per test (building one takes well under a second), progress bars off."""

    @pytest.fixture
    def fixture():
        pipe = builder()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    fixture.__doc__ = builder.__doc__
    return fixture


sd15 = _pipeline_fixture(tiny.tiny_sd15)
sdxl = _pipeline_fixture(tiny.tiny_sdxl)
sd3 = _pipeline_fixture(tiny.tiny_sd3)
sd35 = _pipeline_fixture(tiny.tiny_sd35)
flux = _pipeline_fixture(tiny.tiny_flux)
flux2 = _pipeline_fixture(tiny.tiny_flux2)
qwenimage = _pipeline_fixture(tiny.tiny_qwenimage)
zimage = _pipeline_fixture(tiny.tiny_zimage)
chroma = _pipeline_fixture(tiny.tiny_chroma)
