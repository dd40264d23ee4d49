"""Fixtures for the ComfyUI node tests: each real ComfyUI in turn (skipped when unavailable) and a tiny model.

Every test that needs ComfyUI runs once per tree; its id ends in the tree's version (``[comfyui-0.20.1]``).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.support.comfy import comfyui_trees, tiny_comfy


@pytest.fixture(scope="session", params=comfyui_trees.TREES, ids=lambda tree: f"comfyui-{tree.name}")
def comfyui(request):
    """The bootstrapped ComfyUI (:class:`~tests.support.comfy.comfyui_trees.ComfyUI`); unloaded afterwards."""
    tree = request.param
    try:
        folder = tree.locate()
    except (RuntimeError, OSError, TimeoutError) as error:
        pytest.skip(f"ComfyUI {tree.name} unavailable: {error}")
    try:
        running = comfyui_trees.bootstrap(tree, folder)
    except ModuleNotFoundError as error:
        comfyui_trees.unload(folder)
        pytest.skip(f"ComfyUI {tree.name} needs the package {error.name!r}: pip install -e '.[test]'")
    yield running
    comfyui_trees.unload(folder)


@pytest.fixture(scope="session")
def tiny(comfyui):
    """A tiny SD1.5 ModelPatcher, two conditionings and its plain sample (the baseline every node changes)."""
    with torch.inference_mode():
        model = tiny_comfy.build_tiny_sd15(seed=0)
        positive, negative = tiny_comfy.conditioning(5), tiny_comfy.conditioning(6)
    baseline = tiny_comfy.sample(model, positive, negative)
    return SimpleNamespace(model=model, positive=positive, negative=negative, baseline=baseline, comfyui=comfyui)
