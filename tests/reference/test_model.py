"""The reference pipeline: real classes, SD1.x topology, factor-4 VAE, real CLIP tokenizer, offline load."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from attnsurgery.reference.model import (
    GUIDANCE_SCALE,
    build_reference_pipeline,
    has_reference_weights,
    load_reference_pipeline,
    save_reference_weights,
)


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    torch.manual_seed(0)
    return build_reference_pipeline()


def test_components_are_the_real_classes_with_sd1_topology(pipe: StableDiffusionPipeline) -> None:
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    config = pipe.unet.config
    assert list(config.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert list(config.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert config.layers_per_block == 2
    modules = dict(pipe.unet.named_modules())
    # SD1.5 module names exist, so tools keyed on them find the same layers.
    expected = [
        "down_blocks.0.attentions.1.transformer_blocks.0.attn1",
        "mid_block.attentions.0",
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2",
        "down_blocks.1.resnets.0.conv_shortcut",
    ]
    assert all(path in modules for path in expected)
    assert "down_blocks.3.attentions" not in modules
    assert pipe.vae_scale_factor == 4


def test_vae_maps_native_64_px_to_16_by_16_latents(pipe: StableDiffusionPipeline) -> None:
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert latents.shape == (1, 4, 16, 16)


def test_tokenizer_is_the_real_clip_bpe(pipe: StableDiffusionPipeline) -> None:
    assert len(pipe.tokenizer) == 49408
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert pipe.tokenizer.model_max_length == 77


def test_save_and_load_round_trip_in_fp16(pipe: StableDiffusionPipeline, tmp_path) -> None:
    pipe.vae.register_to_config(scaling_factor=0.75)
    save_reference_weights(pipe, tmp_path)
    loaded = load_reference_pipeline(weights_dir=tmp_path)
    assert loaded.vae.config.scaling_factor == 0.75
    assert loaded.unet.dtype == torch.float32
    assert isinstance(loaded.scheduler, DPMSolverMultistepScheduler)  # sampler; trained with DDIM's maths
    assert loaded.scheduler.config.num_train_timesteps == pipe.scheduler.config.num_train_timesteps
    for name in ("unet", "vae", "text_encoder"):
        original, restored = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert original.keys() == restored.keys()
        for key, value in original.items():
            assert torch.equal(value.half().float(), restored[key].float()), (name, key)


def test_missing_weights_give_an_actionable_error(tmp_path) -> None:
    assert not has_reference_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match="attnsurgery.reference.train"):
        load_reference_pipeline(weights_dir=tmp_path)


@pytest.mark.skipif(not has_reference_weights(), reason="trained reference weights are not in the package")
def test_shipped_weights_make_a_64_px_image_in_two_steps() -> None:
    shipped = load_reference_pipeline()
    shipped.set_progress_bar_config(disable=True)
    image = shipped(
        "a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images[0]
    assert image.shape == (64, 64, 3)
    assert image.std() > 0.01  # a picture, not a flat field


@pytest.mark.skipif(not has_reference_weights(), reason="trained reference weights are not in the package")
def test_shipped_weights_draw_the_prompted_object() -> None:
    """A small sample of the model card's gate (held-out one-object prompts, 20 steps, the model's CFG)."""
    from attnsurgery.reference.eval import evaluate, heldout_pairs, pipeline_sampler

    shipped = load_reference_pipeline()
    shipped.set_progress_bar_config(disable=True)
    report = evaluate(
        pipeline_sampler(shipped, 20, GUIDANCE_SCALE), heldout_pairs(16, num_objects=1, start=500_000), progress=False
    )
    assert report.metrics.fidelity >= 0.6, report.metrics
