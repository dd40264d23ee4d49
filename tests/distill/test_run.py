"""ConvFusion distillation on a tiny SD1.5-tree pipeline: it learns, resumes exactly, refuses bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import attnsurgery as surg
from attnsurgery.cli import main
from attnsurgery.distill import DistillConfig, distill
from attnsurgery.distill.data import cache_from_prompts
from attnsurgery.testing.tiny import tiny_sd15, tiny_sdxl

PROMPTS = ["a red cube", "a blue ball on grass", "two green cones", "a yellow star at night"]
# The tiny teacher has random weights, so it cannot predict the noise: the noise term is a floor the blocks
# cannot lower. These tests train on the two distillation terms, which a working student must drive down.
TEST_CONFIG = DistillConfig(
    loss_weights=(0.0, 1.0, 1.0),
    min_snr_gamma=None,
    batch_size=2,
    lr=3e-3,
    warmup_steps=0,
    caption_dropout=0.0,
    resolution=64,
    checkpoint_every=0,
    teacher_steps=2,
)


@pytest.fixture(scope="module")
def latents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The teacher's own latents for the prompts (2 sampling steps), shared by the tests."""
    pipe = tiny_sd15()
    pipe.set_progress_bar_config(disable=True)
    return cache_from_prompts(pipe, PROMPTS, tmp_path_factory.mktemp("latents"), 64, num_inference_steps=2)


def _student_teacher_error(pipe, plugin) -> float:
    """MSE between the plain and the ConvFusion UNet on held-out noisy latents and prompts."""
    generator = torch.Generator().manual_seed(1234)
    sample = torch.randn(4, 4, 8, 8, generator=generator)
    with torch.no_grad():
        text = pipe.encode_prompt(["a purple pyramid", "an orange ring", "a gray wall", "snow"], "cpu", 1, False)[0]
        timesteps = torch.tensor([50, 300, 600, 900])
        teacher = pipe.unet(sample, timesteps, text).sample
        with surg.patched(pipe, plugin):
            student = pipe.unet(sample, timesteps, text).sample
    return float((student - teacher).square().mean())


def test_distillation_lowers_the_loss_and_the_error_to_the_teacher(latents: Path, tmp_path: Path) -> None:
    pipe = tiny_sd15()
    untouched = {name: p.clone() for name, p in pipe.unet.state_dict().items()}
    config = DistillConfig(**{**TEST_CONFIG.__dict__, "steps": 30})
    result = distill(pipe, latents, tmp_path / "run", config)
    losses = [record["loss"] for record in result.history]
    assert len(losses) == 30
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"loss {start:.4g} -> {end:.4g}")
    assert end < start / 3, (start, end)  # the stated factor: at least 3x lower after 30 steps
    # surg.ConvFusion() builds the same blocks as the trainer's start (same seed, same per-layer generators)
    before = _student_teacher_error(pipe, surg.ConvFusion())
    after = _student_teacher_error(pipe, result.plugin)
    assert before > 1e-4  # removing attn1 changes this model: the comparison is not trivial
    print(f"student-teacher MSE {before:.4g} -> {after:.4g}")
    assert after < before / 2, (before, after)
    # the user's model is back as it was: no surgery, same weights, frozen, no checkpointing
    assert not surg.active_surgeries(pipe)
    assert all(torch.equal(untouched[name], p) for name, p in pipe.unet.state_dict().items())
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"convfusion.safetensors", "convfusion.json", "checkpoints", "log.jsonl"} <= files


def test_resume_continues_exactly(latents: Path, tmp_path: Path) -> None:
    config = DistillConfig(**{**TEST_CONFIG.__dict__, "steps": 4, "warmup_steps": 3})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    # from the prompts file: the teacher makes the same latents as the shared cache (same seed and settings)
    straight = distill(tiny_sd15(), prompts, tmp_path / "straight", config)
    assert (tmp_path / "straight" / "latents" / "cache-complete.json").exists()
    half = DistillConfig(**{**config.__dict__, "steps": 2})
    distill(tiny_sd15(), latents, tmp_path / "split", half)
    resumed = distill(tiny_sd15(), latents, tmp_path / "split", config, resume=True)
    assert [r["step"] for r in resumed.history] == [3, 4]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history[2:]]
    for path, block in straight.plugin.blocks.items():
        for a, b in zip(block.state_dict().values(), resumed.plugin.blocks[path].state_dict().values(), strict=True):
            assert torch.equal(a, b), path
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"other settings \(lr: checkpoint 0.003, now 0.01\)"):
        distill(
            tiny_sd15(),
            latents,
            tmp_path / "split",
            DistillConfig(**{**config.__dict__, "steps": 6, "lr": 0.01}),
            resume=True,
        )
    with pytest.raises(ValueError, match="already holds checkpoints"):
        distill(tiny_sd15(), latents, tmp_path / "split", config)
    with pytest.raises(ValueError, match="Nothing to resume"):
        distill(tiny_sd15(), latents, tmp_path / "empty", config, resume=True)


def test_bad_data_and_targets_fail_clearly(tmp_path: Path) -> None:
    pipe = tiny_sd15()
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        distill(pipe, tmp_path / "images", tmp_path / "out", TEST_CONFIG)
    (tmp_path / "images" / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no caption"):
        distill(pipe, tmp_path / "images", tmp_path / "out", TEST_CONFIG)
    with pytest.raises(ValueError, match="not a bare denoiser"):
        distill(pipe.unet, tmp_path / "images", tmp_path / "out", TEST_CONFIG)
    with surg.patched(pipe, surg.ConvFusion()), pytest.raises(ValueError, match="Remove the surgeries"):
        distill(pipe, tmp_path / "images", tmp_path / "out", TEST_CONFIG)
    with pytest.raises(ValueError, match="preset"):
        DistillConfig(preset="clear")


def test_cli_entry_trains_from_an_image_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for index, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (80, 64), colour).save(images / f"{index}.png")
        (images / f"{index}.txt").write_text(f"a plain colour {index}")
    pipe = tiny_sd15()
    monkeypatch.setattr("attnsurgery.cli.distill_cmd.load_pipeline", lambda *args, **kwargs: pipe)
    code = main(
        [
            "distill",
            "--model",
            "tiny",
            "--data",
            str(images),
            "--out",
            str(tmp_path / "out"),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--resolution",
            "64",
            "--gradient-checkpointing",
        ]
    )
    assert code == 0
    plugin = surg.ConvFusion.from_pretrained(tmp_path / "out")
    assert len(plugin.blocks) == 16
    assert not pipe.unet.is_gradient_checkpointing


def test_sdxl_pipeline_trains_with_its_added_conditioning(tmp_path: Path) -> None:
    """SDXL needs pooled text and time ids besides the text states; one step proves the path is wired."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    result = distill(tiny_sdxl(), prompts, tmp_path / "out", DistillConfig(**{**TEST_CONFIG.__dict__, "steps": 1}))
    assert len(result.plugin.blocks) == 70  # SDXL's attn1 count: 2 * 2 + 2 * 10 down, 10 mid, 3 * (2 + 10) up
    assert result.history[0]["feature"] > 0 and result.history[0]["teacher"] > 0


def test_the_learning_rate_cools_down_to_zero_over_the_last_steps(latents: Path, tmp_path: Path) -> None:
    config = DistillConfig(**{**TEST_CONFIG.__dict__, "steps": 4, "warmup_steps": 0, "cooldown_steps": 2})
    result = distill(tiny_sd15(), latents, tmp_path / "run", config)
    lr = TEST_CONFIG.lr
    assert [row["lr"] for row in result.history] == pytest.approx([lr, lr, lr, lr / 2])
