"""The repository as a ComfyUI custom node: loaded by each ComfyUI's own loader, and its registry metadata."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import attnsurgery
import attnsurgery.comfy as pack

REPO = Path(__file__).resolve().parents[2]


def test_a_clone_in_custom_nodes_registers_every_node(comfyui, tmp_path):
    """A clone (or registry install) named ``attnsurgery`` in custom_nodes/, attnsurgery not pip-installed:
    the tree's loader registers every node, and ``attnsurgery`` is the library, not the node folder (the
    March 2024 loader registers the folder under its name)."""
    folder = tmp_path / "custom_nodes" / "attnsurgery"
    folder.parent.mkdir()
    folder.symlink_to(REPO, target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    probe = [sys.executable, "-m", "tests.support.comfy.custom_node_probe", str(comfyui.tree.locate()), str(folder)]
    result = subprocess.run(probe, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] is True and not report["imported_alone"]
    assert pack.NODE_CLASS_MAPPINGS, "no nodes: the loader's list would match an empty one"
    assert report["nodes"] == sorted(pack.NODE_CLASS_MAPPINGS)
    assert os.path.realpath(report["library"]) == str(REPO / "attnsurgery" / "__init__.py")
    assert report["has_apply"]


def test_comfyui_reads_the_registry_metadata(comfyui):
    """ComfyUI's own pyproject parser (0.20.1's comfy_config, what the registry tooling reads) sees the node."""
    if not comfyui.modern:
        pytest.skip("ComfyUI of March 2024 reads no pyproject.toml")
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(REPO))
    assert config.project.name == "attnsurgery" and config.project.version == attnsurgery.__version__
    assert config.tool_comfy.publisher_id and config.tool_comfy.display_name


def test_requirements_repeat_the_dependencies():
    """ComfyUI-Manager's git installs read requirements.txt; it must list exactly the library's dependencies."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = (REPO / "requirements.txt").read_text().splitlines()
    assert project["dependencies"], "no dependencies: an empty requirements.txt would repeat them"
    assert [line for line in lines if line and not line.startswith("#")] == project["dependencies"]
    assert project["version"] == attnsurgery.__version__
