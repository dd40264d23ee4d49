"""The reference DiT: a real FluxPipeline with the reference world's VAE, its sampling defaults, its files."""

from __future__ import annotations

import json

import pytest
import torch

from attnsurgery.families import detect_family
from attnsurgery.pipelines.loading import default_guidance_scale, load_pipeline
from attnsurgery.reference import train as train_module
from attnsurgery.reference.flux_model import (
    FLUX_WEIGHTS_DIR,
    GUIDANCE_SCALE,
    TEXT_TOKENS,
    ReferenceFluxPipeline,
    build_reference_flux_pipeline,
    is_flux_reference_folder,
    load_reference_flux_pipeline,
    save_reference_flux_weights,
)
from attnsurgery.reference.shapes import make_scene
from attnsurgery.reference.train import TrainConfig, train


@pytest.fixture(scope="module")
def pipe() -> ReferenceFluxPipeline:
    pipe = build_reference_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_it_is_a_flux_model_of_the_reference_image_space(pipe):
    family = detect_family(pipe.transformer, pipe.vae_scale_factor)
    assert family.name == "flux" and pipe.vae_scale_factor == 4 and family.native_resolution == 64
    assert not pipe.transformer.config.guidance_embeds
    assert pipe.transformer.config.num_attention_heads > 2  # heads are addressable
    assert type(pipe).__mro__[1].__name__ == "FluxPipeline"


def test_captions_are_one_token_per_word_and_fit_the_text_length(pipe):
    longest = "a purple triangle on the left, an orange circle at the top and a yellow square on the right"
    ids = pipe.tokenizer_2(longest).input_ids
    assert len(ids) == len(longest.replace(",", " ,").split()) + 1 <= TEXT_TOKENS  # + </s>
    assert pipe.tokenizer_2.unk_token_id not in ids
    for seed in range(50):  # every caption of the grammar
        assert pipe.tokenizer_2.unk_token_id not in pipe.tokenizer_2(make_scene(seed).caption).input_ids


def test_calls_default_to_the_trained_text_length_and_true_cfg(pipe):
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape), with_kwargs=True
    )
    try:
        pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np")
        assert seen == [(1, TEXT_TOKENS, 128)] * 4  # cond and uncond, two steps: guidance is on by default
        seen.clear()
        pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np", guidance_scale=1.0)
        assert len(seen) == 2  # guidance 1 turns CFG off
        seen.clear()
        image = pipe("a red circle", num_inference_steps=1, output_type="np", guidance_scale=1.0).images[0]
        assert image.shape == (64, 64, 3)  # the native size by default, not FLUX.1's
    finally:
        hook.remove()


def test_weights_round_trip_and_load_pipeline_finds_the_folder(pipe, tmp_path):
    pipe.vae.register_to_config(shift_factor=-0.5, scaling_factor=0.4)
    save_reference_flux_weights(pipe, tmp_path)
    assert is_flux_reference_folder(tmp_path) and json.loads((tmp_path / "config.json").read_text())["topology"]
    loaded = load_pipeline(tmp_path)
    assert isinstance(loaded, ReferenceFluxPipeline)
    assert loaded.vae.config.shift_factor == -0.5 and loaded.vae.config.scaling_factor == 0.4
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        for key, value in getattr(pipe, name).state_dict().items():
            assert torch.equal(getattr(loaded, name).state_dict()[key], value.half().float()), (name, key)
    assert default_guidance_scale(tmp_path) == GUIDANCE_SCALE == default_guidance_scale("reference-flux")


def test_a_folder_without_weights_names_the_training_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="--topology flux --out DIR"):
        load_reference_flux_pipeline(weights_dir=tmp_path)


TINY = dict(topology="flux", batch_size=2, warmup_steps=1, cooldown_steps=0)


def _weights(folder):
    loaded = load_reference_flux_pipeline(weights_dir=folder)
    return {
        f"{n}.{k}": v
        for n in ("transformer", "text_encoder", "text_encoder_2", "vae")
        for k, v in getattr(loaded, n).state_dict().items()
    }


@pytest.mark.slow
def test_flux_training_resumes_exactly_and_writes_its_card(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "SCALE_SAMPLE_SIZE", 2)
    monkeypatch.setattr(train_module, "CHECKPOINT_EVERY", 1)
    train(TrainConfig(steps=3, **TINY), tmp_path / "whole")
    train(TrainConfig(steps=1, **TINY), tmp_path / "parts")
    first = _weights(tmp_path / "parts")
    train(TrainConfig(steps=3, **TINY), tmp_path / "parts", resume=True)
    whole, parts = _weights(tmp_path / "whole"), _weights(tmp_path / "parts")
    assert any(not torch.equal(first[k], parts[k]) for k in parts if k.startswith("transformer."))
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    card = (tmp_path / "parts" / "MODEL_CARD.md").read_text()
    assert card.startswith("# attnsurgery reference DiT") and "| transformer | 3 |" in card
    assert "rectified flow" in card and "transformer + text encoders 3 steps" in card
    config = json.loads((tmp_path / "parts" / "config.json").read_text())
    assert config["vae"]["shift_factor"] != 0.0  # the latent mean was measured


@pytest.mark.skipif(not is_flux_reference_folder(FLUX_WEIGHTS_DIR), reason="the reference DiT's weights do not ship")
def test_shipped_dit_draws_the_prompted_object() -> None:
    """A small sample of the card's gate (held-out one-object prompts, 20 steps, the model's own CFG)."""
    from attnsurgery.reference.eval import evaluate, heldout_pairs, pipeline_sampler

    shipped = load_pipeline("reference-flux")
    shipped.set_progress_bar_config(disable=True)
    pairs = heldout_pairs(16, num_objects=1, start=500_000)
    report = evaluate(pipeline_sampler(shipped, 20, GUIDANCE_SCALE), pairs, progress=False)
    assert report.metrics.fidelity >= 0.6, report.metrics
