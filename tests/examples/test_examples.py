"""Every script in examples/ runs end to end at small settings, offline, on the shipped reference model."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from attnsurgery.reference.model import has_reference_weights

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.skipif(not has_reference_weights(), reason="the reference weights are not installed")


def run_example(name: str, *args: str, capsys) -> str:
    argv = sys.argv
    sys.argv = [name, *args]
    try:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    finally:
        sys.argv = argv
    return capsys.readouterr().out


def test_every_example_is_covered_here():
    tested = {"patch_a_pipeline.py", "head_pag_with_a_head_set.py", "side_by_side_grid.py", "write_your_own_plugin.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


@pytest.mark.slow
def test_patch_a_pipeline(tmp_path, capsys):
    out = run_example("patch_a_pipeline.py", "--steps", "2", "--out", str(tmp_path), capsys=capsys)
    assert "HiDiffusion" in out and (tmp_path / "plain.png").is_file() and (tmp_path / "hidiffusion.png").is_file()


@pytest.mark.slow
def test_head_pag_with_a_head_set(tmp_path, capsys):
    out = run_example(
        "head_pag_with_a_head_set.py",
        "--steps",
        "2",
        "--seeds",
        "0",
        "--prompts",
        "a red circle",
        "--out",
        str(tmp_path),
        capsys=capsys,
    )
    assert "selected heads ['up_blocks.1.attentions.0" in out and (tmp_path / "heads.json").is_file()
    assert "'a red circle': " in out and (tmp_path / "pag-heads-0.png").is_file()


@pytest.mark.slow
def test_side_by_side_grid(tmp_path, capsys):
    from PIL import Image

    grid = tmp_path / "grid.png"
    out = run_example("side_by_side_grid.py", "--steps", "2", "--scales", "1", "2", "--out", str(grid), capsys=capsys)
    assert "5 configurations x 2 sizes" in out
    assert Image.open(grid).size == (5 * 192, 20 + 2 * (192 + 40))


@pytest.mark.slow
def test_write_your_own_plugin(capsys):
    out = run_example("write_your_own_plugin.py", "--steps", "3", capsys=capsys)
    assert "a second plugin claiming the same layers is refused: conflict at" in out
    change = float(out.split("max pixel change while patched ")[1].split(";")[0])
    assert change > 1e-3 and "restored exactly" in out
