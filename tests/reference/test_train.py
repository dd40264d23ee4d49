"""The training script runs end to end and writes loadable weights and a model card."""

from __future__ import annotations

import json

import pytest
import torch

from attnsurgery.reference import train as train_module
from attnsurgery.reference.model import load_reference_pipeline
from attnsurgery.reference.train import SceneStream, TrainConfig, evaluate_into_card, loss_summary, train


@pytest.mark.slow
def test_two_step_training_writes_loadable_weights_and_card(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(train_module, "SCALE_SAMPLE_SIZE", 2)  # keep the test cheap
    cfg = TrainConfig(vae_steps=2, vae_batch_size=2, steps=2, batch_size=2, warmup_steps=1, cooldown_steps=0)
    train(cfg, tmp_path)
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["steps_done"] == 2 and record["vae_steps_done"] == 2
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "python -m attnsurgery.reference.train" in card and "| unet | 2 |" in card
    pipe = load_reference_pipeline(weights_dir=tmp_path)
    assert pipe.vae.config.scaling_factor == record["scaling_factor"] != 1.0

    evaluate_into_card(tmp_path, steps=2, counts=[2, 0, 0, 0, 0])
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "| one object | 64 | 2 |" in card and "two objects" not in card


def test_scene_stream_is_deterministic_and_in_range() -> None:
    images, captions = SceneStream(3).batch(4)
    again, captions_again = SceneStream(3).batch(4)
    assert torch.equal(images, again) and captions == captions_again
    assert images.shape == (4, 3, 64, 64) and images.min() >= -1 and images.max() <= 1


def test_loss_summary_spans_the_whole_run() -> None:
    assert loss_summary([4.0, 2.0, 1.0, 1.0], rows=2) == [(2, 3.0), (4, 1.0)]
    assert loss_summary([]) == []


def test_module_runs_as_a_script() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "attnsurgery.reference.train", "--help"], capture_output=True, text=True, check=True
    )
    assert "--steps" in result.stdout and "--eval-pairs" in result.stdout


TINY = dict(vae_steps=2, vae_batch_size=2, batch_size=2, warmup_steps=1, cooldown_steps=0)


def _weights(folder):
    pipe = load_reference_pipeline(weights_dir=folder)
    return {
        f"{name}.{k}": v
        for name in ("unet", "text_encoder", "vae")
        for k, v in getattr(pipe, name).state_dict().items()
    }


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(train_module, "SCALE_SAMPLE_SIZE", 2)
    monkeypatch.setattr(train_module, "CHECKPOINT_EVERY", 1)
    train(TrainConfig(steps=4, **TINY), tmp_path / "whole")
    train(TrainConfig(steps=2, **TINY), tmp_path / "parts")
    first_half = _weights(tmp_path / "parts")
    train(TrainConfig(steps=4, **TINY), tmp_path / "parts", resume=True)  # --steps raised from 2 to 4
    whole, parts = _weights(tmp_path / "whole"), _weights(tmp_path / "parts")
    assert any(not torch.equal(first_half[k], parts[k]) for k in parts)  # the resumed steps did train
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    record = json.loads((tmp_path / "parts" / "training.json").read_text())
    assert record["steps_done"] == 4 and len(record["commands"]) == 2
    with pytest.raises(ValueError, match=r"other settings \(\['lr'\]\)"):
        train(TrainConfig(steps=5, lr=1e-4, **TINY), tmp_path / "parts", resume=True)


@pytest.mark.slow
def test_init_from_starts_a_second_stage_from_earlier_weights(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(train_module, "SCALE_SAMPLE_SIZE", 2)
    train(TrainConfig(steps=2, **TINY), tmp_path / "first")
    train(TrainConfig(steps=3, **TINY), tmp_path / "second", init_from=tmp_path / "first")
    first, second = _weights(tmp_path / "first"), _weights(tmp_path / "second")
    assert all(torch.equal(first[k], second[k]) for k in first if k.startswith("vae."))  # the VAE is kept
    assert any(not torch.equal(first[k], second[k]) for k in first if k.startswith("unet."))
    record = json.loads((tmp_path / "second" / "training.json").read_text())
    assert record["total_steps"] == 5 and record["vae_steps_done"] == 0 and len(record["commands"]) == 2
    card = (tmp_path / "second" / "MODEL_CARD.md").read_text()
    assert card.count("python -m attnsurgery.reference.train") == 2 and "UNet + text encoder 5 steps" in card
    with pytest.raises(ValueError, match="--resume .* or --init-from"):
        train(TrainConfig(steps=3, **TINY), tmp_path / "second", resume=True, init_from=tmp_path / "first")


@pytest.mark.slow
def test_v_prediction_training_saves_a_v_prediction_pipeline(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(train_module, "SCALE_SAMPLE_SIZE", 2)
    train(TrainConfig(steps=2, prediction_type="v_prediction", **TINY), tmp_path)
    pipe = load_reference_pipeline(weights_dir=tmp_path)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert "v_prediction prediction" in (tmp_path / "MODEL_CARD.md").read_text()
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        train(TrainConfig(steps=2, prediction_type="sample", **TINY), tmp_path / "bad")


def test_lr_warms_up_holds_then_cools_down_to_zero() -> None:
    cfg = TrainConfig(steps=10, warmup_steps=2, cooldown_steps=4)
    factors = [train_module.lr_factor(cfg, step) for step in range(10)]
    assert factors == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert train_module.lr_factor(TrainConfig(steps=10, warmup_steps=2, cooldown_steps=0), 9) == 1.0


@pytest.mark.slow
def test_a_cool_down_can_be_added_when_resuming(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(train_module, "SCALE_SAMPLE_SIZE", 2)
    monkeypatch.setattr(train_module, "CHECKPOINT_EVERY", 1)
    train(TrainConfig(steps=2, **TINY), tmp_path / "constant")
    cooled = {**TINY, "cooldown_steps": 2}
    train(TrainConfig(steps=4, **cooled), tmp_path / "constant", resume=True)
    train(TrainConfig(steps=4, **cooled), tmp_path / "planned")
    train(TrainConfig(steps=4, **TINY), tmp_path / "never cooled")
    planned, resumed = _weights(tmp_path / "planned"), _weights(tmp_path / "constant")
    never = _weights(tmp_path / "never cooled")
    assert any(not torch.equal(planned[k], never[k]) for k in planned)  # the cool-down changes the weights
    assert all(torch.equal(planned[k], resumed[k]) for k in planned)  # the cool-down starts after step 2 either way
    assert "cool-down 2" in (tmp_path / "constant" / "MODEL_CARD.md").read_text()
    with pytest.raises(ValueError, match="cooldown_steps must be between 0 and steps"):
        train(TrainConfig(steps=2, **{**TINY, "cooldown_steps": 3}), tmp_path / "bad")


def test_the_command_cools_down_over_the_last_fifth_unless_told(tmp_path, monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(train_module, "train", lambda cfg, *args, **kwargs: seen.append(cfg))
    train_module.main(["--out", str(tmp_path), "--steps", "50"])
    train_module.main(["--out", str(tmp_path), "--steps", "50", "--cooldown-steps", "0"])
    assert [cfg.cooldown_steps for cfg in seen] == [10, 0]
    assert seen[0].prediction_type == "v_prediction"
