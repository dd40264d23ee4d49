"""Test set-up: offline hub, few threads, and small builders for the tiny pipelines."""

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

DIT_KWARGS = {"max_sequence_length": 16}


def run_pipe(pipe, prompt: str = "a red circle", steps: int = 2, size: int = 64, seed: int = 0, **kwargs):
    """Run a pipeline deterministically and return its output as a float tensor (numpy output type)."""
    if type(pipe).__name__.startswith(("StableDiffusion3", "Flux")):
        kwargs = {**DIT_KWARGS, **kwargs}
    generator = torch.Generator("cpu").manual_seed(seed)
    height, width = (size, size) if isinstance(size, int) else size
    out = pipe(prompt, num_inference_steps=steps, height=height, width=width, generator=generator,
               output_type="np", **kwargs)
    return torch.from_numpy(out.images)


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
