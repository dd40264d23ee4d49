"""Distillation data: latent shards, caption discovery, deterministic batch order, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from attnsurgery.distill.data import (
    LatentFolder,
    find_captioned_images,
    load_image,
    read_prompts,
    write_shard,
)


def _latent_folder(tmp_path: Path, sizes: tuple[int, ...] = (5, 3)) -> Path:
    start = 0
    for index, size in enumerate(sizes):
        ids = torch.arange(start, start + size, dtype=torch.float32)
        latents = ids.view(size, 1, 1, 1).expand(size, 4, 2, 2)
        captions = [f"c{start + i}" for i in range(size)]
        write_shard(tmp_path / f"shard-{index:05d}.safetensors", latents, captions)
        start += size
    return tmp_path


def test_batches_cover_each_epoch_once_and_depend_only_on_seed_and_step(tmp_path: Path) -> None:
    data = LatentFolder(_latent_folder(tmp_path))
    assert len(data) == 8 and data.latent_shape == (4, 2, 2)
    epoch = [data.batch(seed=3, step=step, batch_size=2) for step in range(4)]
    ids = [int(x) for latents, _ in epoch for x in latents[:, 0, 0, 0]]
    assert sorted(ids) == list(range(8))
    assert [c for _, captions in epoch for c in captions] == [f"c{i}" for i in ids]
    assert ids != list(range(8))  # shuffled
    again = LatentFolder(tmp_path).batch(seed=3, step=2, batch_size=2)
    assert torch.equal(again[0], epoch[2][0]) and again[1] == epoch[2][1]
    other_seed = [int(x) for s in range(4) for x in data.batch(seed=4, step=s, batch_size=2)[0][:, 0, 0, 0]]
    assert other_seed != ids


def test_latent_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no .safetensors shards"):
        LatentFolder(tmp_path)
    write_shard(tmp_path / "a.safetensors", torch.zeros(2, 4, 2, 2), ["x", "y"])
    write_shard(tmp_path / "b.safetensors", torch.zeros(2, 4, 3, 3), ["x", "y"])
    with pytest.raises(ValueError, match="single resolution"):
        LatentFolder(tmp_path)


def test_captions_from_sidecars_and_metadata(tmp_path: Path) -> None:
    for name in ("a.png", "b.jpg", "c.png"):
        Image.new("RGB", (12, 8), (255, 0, 0)).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("a red box\n")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "b.jpg", "text": "from metadata"}\n')
    with pytest.raises(ValueError, match=r"1 of 3 images .* no caption \(c.png\)"):
        find_captioned_images(tmp_path)
    (tmp_path / "c.txt").write_text("third")
    samples = find_captioned_images(tmp_path)
    assert [(s.image.name, s.caption) for s in samples] == [
        ("a.png", "a red box"),
        ("b.jpg", "from metadata"),
        ("c.png", "third"),
    ]


def test_empty_inputs_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no images"):
        find_captioned_images(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(prompts)


def test_load_image_crops_to_a_square_in_range(tmp_path: Path) -> None:
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 5, 10))  # white strip on the left edge, cropped away
    image.save(tmp_path / "x.png")
    pixels = load_image(tmp_path / "x.png", 8)
    assert pixels.shape == (3, 8, 8)
    assert pixels.min() == -1.0 and pixels.max() < 1.0
