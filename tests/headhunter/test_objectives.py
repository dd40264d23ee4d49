"""The head search's objectives: CLIP/PickScore and aesthetic on a tiny local CLIP, the reference evaluator,
user functions, and offline errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from attnsurgery.headhunter.objectives import AestheticScore, ClipScore, ReferenceScore, aesthetic_head, make_objective
from attnsurgery.reference.shapes import make_scene, render
from attnsurgery.testing.tiny import byte_clip_tokenizer

PROJECTION = 16


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A random-weight CLIPModel with a processor, saved as a local folder (what an offline user passes)."""
    torch.manual_seed(0)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=514, max_position_embeddings=77, bos_token_id=512, eos_token_id=513, **layers),
        vision_config=dict(image_size=32, patch_size=8, **layers),
        projection_dim=PROJECTION,
    )
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=byte_clip_tokenizer()).save_pretrained(folder)
    return folder


def _images(n: int, size: int = 64) -> list[np.ndarray]:
    return [render(make_scene(seed), size) for seed in range(n)]


def test_clip_score_is_scaled_cosine_per_pair(clip_folder):
    clip = ClipScore(str(clip_folder), batch_size=2)
    images, prompts = _images(3), ["a red circle", "a blue square", "a green triangle"]
    scores = clip(images, prompts)
    model, processor = CLIPModel.from_pretrained(clip_folder), CLIPProcessor.from_pretrained(clip_folder)
    with torch.no_grad():
        out = model(**processor(text=prompts, images=images, return_tensors="pt", padding=True))
    expected = out.logits_per_image.diagonal()  # CLIP's own logits of each image with its own prompt
    assert np.allclose(scores, expected.numpy(), atol=1e-4)
    assert len(set(np.round(scores, 4))) == 3  # not a constant


def test_pickscore_uses_the_given_model_and_processor(clip_folder):
    pick = make_objective("pickscore", model=str(clip_folder), processor=str(clip_folder))
    clip = make_objective("clip", model=str(clip_folder))
    images, prompts = _images(2), ["a red circle", "a blue square"]
    assert pick(images, prompts) == clip(images, prompts)


def test_aesthetic_score_is_the_mlp_on_unit_embeddings(clip_folder, tmp_path):
    torch.manual_seed(1)
    head = aesthetic_head(PROJECTION)
    state = {f"layers.{k}": v for k, v in head.state_dict().items()}  # the LAION checkpoint's key names
    torch.save(state, tmp_path / "head.pth")
    score = AestheticScore(tmp_path / "head.pth", clip_model=str(clip_folder))
    images = _images(2)
    model, processor = CLIPModel.from_pretrained(clip_folder), CLIPProcessor.from_pretrained(clip_folder)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=processor(images=images, return_tensors="pt").pixel_values)
        features = features if isinstance(features, torch.Tensor) else features.pooler_output
        expected = head.eval()(features / features.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert np.allclose(score(images, ["", ""]), expected.numpy(), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="sac\\+logos"):
        AestheticScore(tmp_path / "nope.pth", clip_model=str(clip_folder))


def test_a_hub_id_offline_says_how_to_use_a_local_folder():
    with pytest.raises(RuntimeError, match=r"huggingface-cli download openai/clip-vit-large-patch14.*--objective"):
        make_objective("clip")


def test_reference_score_grades_found_spurious_and_clean_objects():
    scene = make_scene(3, 1)
    image = render(scene, 64)
    reference = ReferenceScore()
    right, wrong = reference([image, image], [scene.caption, "a purple triangle"])
    assert right == pytest.approx(1.25)  # the object found, clean, nothing spurious
    assert wrong == pytest.approx(-0.5 + 0.25)  # nothing found, one spurious object, which is clean
    blank = np.full((64, 64, 3), 200, np.uint8)
    assert reference([blank], [scene.caption]) == [0.0]


def test_python_objectives_are_imported(tmp_path, monkeypatch):
    (tmp_path / "my_objective.py").write_text("def score(images, prompts):\n    return [len(p) for p in prompts]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert make_objective("python:my_objective:score")([None], ["abc"]) == [3]
    with pytest.raises(ValueError, match="cannot import objective"):
        make_objective("python:my_objective:missing")
    with pytest.raises(ValueError, match="package.module:function"):
        make_objective("python:my_objective")
    with pytest.raises(ValueError, match="head's weights file"):
        make_objective("aesthetic")
