"""compare_setups: plain first at every size, closeness against the plain images of the same pairs."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

import attnsurgery as surg
from attnsurgery.pipelines.comparison import compare_setups, markdown_table
from attnsurgery.reference.eval import heldout_pairs
from attnsurgery.reference.shapes import make_scene, render
from attnsurgery.testing.tiny import tiny_sd15

_CARDS_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "reference_cards.py"
_spec = importlib.util.spec_from_file_location("reference_cards", _CARDS_SCRIPT)
_cards = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cards)
CARDS, DEFAULT_CARDS = _cards.CARDS, _cards.DEFAULT_CARDS


def test_rows_compare_each_setup_with_plain_at_its_size():
    pipe = tiny_sd15()
    pairs = heldout_pairs(3, num_objects=1)

    def generate(prompts, seeds, size):
        """The true scenes; noisier while a surgery is applied, so closeness has something to measure."""
        noisy = any(surgery.plugins for surgery in surg.active_surgeries(pipe))
        images = []
        for seed in seeds:
            image = render(make_scene(seed, num_objects=1), size).astype(np.int16)
            if noisy:
                image += np.random.default_rng(seed).integers(-20, 21, size=image.shape, dtype=np.int16)
            images.append(np.clip(image, 0, 255).astype(np.uint8))
        return images

    setups = [("PAG", [surg.PerturbedAttention()])]  # no plain row given: one is added in front
    rows = compare_setups(pipe, generate, setups, pairs, sizes=[64, 128])
    assert [(r.setup, r.size) for r in rows] == [("plain", 64), ("plain", 128), ("PAG", 64), ("PAG", 128)]
    assert rows[0].psnr is None and rows[0].time_ratio == 1.0
    assert rows[0].report.metrics.fidelity == 1.0  # the true scenes pass the evaluator
    assert all(20 < r.psnr < math.inf and r.ssim < 1 for r in rows[2:])
    assert not surg.active_surgeries(pipe)
    table = markdown_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and table[2].startswith("| plain | 64 | 1.000 |")


def test_the_card_script_writes_a_table_per_reference_model(tmp_path):
    """``benchmarks/reference_cards.py`` at one pair, native size and 2 steps: the real code path, in seconds."""
    out = tmp_path / "cards.md"
    command = [sys.executable, str(_CARDS_SCRIPT), "--out", str(out)]
    subprocess.run([*command, "--pairs", "1", "--sizes", "1", "--steps", "2"], check=True, capture_output=True)
    text = out.read_text()
    for card in DEFAULT_CARDS:
        assert f"## `{card}`" in text
        for label, _ in CARDS[card][1]:
            assert f"| {label} | 64 |" in text
