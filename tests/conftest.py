"""Test set-up: offline hub, few threads, and small builders for the tiny pipelines."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

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


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sd15():
    return _quiet(tiny.tiny_sd15())


@pytest.fixture
def sdxl():
    return _quiet(tiny.tiny_sdxl())


@pytest.fixture
def sd3():
    return _quiet(tiny.tiny_sd3())


@pytest.fixture
def sd35():
    return _quiet(tiny.tiny_sd35())


@pytest.fixture
def flux():
    return _quiet(tiny.tiny_flux())
