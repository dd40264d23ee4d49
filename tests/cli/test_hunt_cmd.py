"""`attnsurgery hunt` on the reference architecture (random weights): the head set, the report, resume."""

from __future__ import annotations

import json

import pytest

from attnsurgery.cli import main
from attnsurgery.reference.model import build_reference_pipeline, save_reference_weights

OBJECTIVE_MODULE = '''
import os
import numpy as np

CALLS = {"n": 0}


def score(images, prompts):
    """Prefers dark images; raises KeyboardInterrupt at call STOP_AT (an interruption mid-search)."""
    CALLS["n"] += 1
    if CALLS["n"] == int(os.environ.get("STOP_AT", "0")):
        raise KeyboardInterrupt
    return [-float(np.asarray(image, np.float64).mean()) for image in images]
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hunt_cli")
    save_reference_weights(build_reference_pipeline(), folder / "model")
    (folder / "prompts.txt").write_text("# search prompts\na red circle\n\na blue square\n")
    (folder / "dark_objective.py").write_text(OBJECTIVE_MODULE)
    return folder


def _argv(setup, out, *extra):
    return [
        "hunt",
        "--model",
        str(setup / "model"),
        "--prompts",
        str(setup / "prompts.txt"),
        "--seeds",
        "0",
        "--objective",
        "python:dark_objective:score",
        "--candidates",
        "top",
        "--top-k",
        "2",
        "--steps",
        "2",
        "--batch-candidates",
        "4",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def test_hunt_writes_a_head_set_and_resumes_exactly(setup, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(setup))
    assert main(_argv(setup, setup / "full.json", "--grid", str(setup / "grid.png"))) == 0
    out = capsys.readouterr().out
    full = json.loads((setup / "full.json").read_text())
    assert len(full["heads"]) == 2 and "| 1 | base" in out and "denoiser calls" in out
    assert (setup / "grid.png").exists() and not (setup / "full.json.progress.json").exists()

    import dark_objective

    dark_objective.CALLS["n"] = 0
    monkeypatch.setenv("STOP_AT", "3")
    with pytest.raises(KeyboardInterrupt):
        main(_argv(setup, setup / "cut.json"))
    assert (setup / "cut.json.progress.json").exists() and not (setup / "cut.json").exists()
    assert main(_argv(setup, setup / "cut.json")) == 2
    assert "pass --resume" in capsys.readouterr().err
    monkeypatch.setenv("STOP_AT", "0")
    assert main(_argv(setup, setup / "cut.json", "--resume")) == 0
    assert json.loads((setup / "cut.json").read_text()) == full


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seeds", "a"], "--seeds takes comma-separated integers"),
        (["--prompts", "missing.txt"], "does not exist"),
        (["--objective", "aesthetic"], "head's weights file"),
    ],
)
def test_hunt_bad_arguments(setup, extra, message, capsys, tmp_path):
    assert main([*_argv(setup, tmp_path / "h.json"), *extra]) == 2
    assert message in capsys.readouterr().err
