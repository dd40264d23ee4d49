"""attnsurgery.hunt end to end on tiny pipelines: the head set it writes, loading it, presets, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import attnsurgery as surg
from attnsurgery.headhunter import HeadSet, preset_for, report_table
from tests.support.pipes import run_pipe

PROMPTS = ["a red circle", "a blue square"]


def darkness(images, prompts):
    return [-float(np.asarray(image, np.float64).mean()) for image in images]


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    """A small search on tiny SD1.5 (top-level heads only), saved as JSON."""
    from attnsurgery.testing.tiny import tiny_sd15

    pipe = tiny_sd15()
    pipe.set_progress_bar_config(disable=True)
    result = surg.hunt(
        pipe,
        PROMPTS,
        seeds=[0],
        objective=darkness,
        candidates="top",
        top_k=2,
        rounds=2,
        steps=2,
        cfg=4.0,
        height=64,
        width=64,
        batch_candidates=16,
        progress=False,
    )
    path = result.head_set.save(tmp_path_factory.mktemp("hunt") / "heads.json")
    return pipe, result, path


def test_the_search_reports_its_heads_rounds_and_cost(found):
    pipe, result, path = found
    head_set = result.head_set
    assert len(head_set.heads) == 4 and len(set(head_set.heads)) == 4
    assert all(h.startswith(("down_blocks.0.", "up_blocks.3.")) for h in head_set.heads)
    assert [r.round for r in head_set.rounds] == [1, 2]
    for r in head_set.rounds:  # the chosen heads beat the set they were added to, and come best first
        assert r.selected[0].score >= r.selected[1].score > r.base_score
    assert result.denoiser_calls < result.exhaustive_calls / 4
    assert "| 1 | base" in report_table(head_set)
    data = json.loads(path.read_text())
    assert data["format"] == "attnsurgery-headset" and data["fingerprint"]["family"] == "sd15"


def test_a_saved_head_set_applies_like_the_same_heads_given_as_strings(found):
    pipe, result, path = found
    plain = run_pipe(pipe, guidance_scale=4.0)
    with surg.patched(pipe, surg.PerturbedAttention(scale=3.0, heads=Path(path))):
        from_file = run_pipe(pipe, guidance_scale=4.0)
    with surg.patched(pipe, surg.PerturbedAttention(scale=3.0, heads=list(result.head_set.heads))):
        from_strings = run_pipe(pipe, guidance_scale=4.0)
    assert (from_file - plain).abs().max() > 1e-3
    assert torch.equal(from_file, from_strings)


def test_a_head_set_for_another_model_fails_clearly(found, sd3):
    _, _, path = found
    with pytest.raises(ValueError, match=r"searched on a sd15 model .* model here is sd3 .* run `attnsurgery hunt`"):
        surg.apply(sd3, surg.PerturbedAttention(heads=Path(path)))
    assert not surg.active_surgeries(sd3)


def test_head_set_files_are_checked(tmp_path, sd15):
    with pytest.raises(FileNotFoundError, match="attnsurgery hunt"):
        surg.apply(sd15, surg.PerturbedAttention(heads=Path(tmp_path / "missing.json")))
    (tmp_path / "other.json").write_text('{"heads": []}')
    with pytest.raises(ValueError, match="not an attnsurgery head set"):
        HeadSet.load(tmp_path / "other.json")


def test_presets_follow_the_paper():
    sd3, flux, unet = preset_for("sd3", "mmdit"), preset_for("flux", "mmdit"), preset_for("sd15", "unet")
    assert (sd3.rounds, sd3.top_k, sd3.scale, sd3.steps) == (1, 24, 3.0, 20)
    assert (flux.scale, flux.steps, flux.size) == (8.0, 15, 512)
    assert unet.cfg == 4.0 and unet.scale == 3.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": "a red circle"}, "non-empty list"),
        ({"seeds": []}, "at least one seed"),
        ({"top_k": 0}, "top_k=0"),
        ({"soft": 1.5}, "soft=1.5"),
        ({"kind": "temperature"}, "kind='temperature'"),
        ({"candidates": "down_blocks.9"}, "down_blocks.9"),
        ({"objective": "pixels"}, "unknown objective"),
    ],
)
def test_bad_settings_fail_before_anything_runs(sd15, kwargs, message):
    args = {"prompts": PROMPTS, "seeds": [0], "objective": darkness, **kwargs}
    with pytest.raises(ValueError, match=message):
        surg.hunt(sd15, args.pop("prompts"), progress=False, **args)
    assert not surg.active_surgeries(sd15)
