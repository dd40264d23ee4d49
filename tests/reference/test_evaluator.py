"""The analytic evaluator: right on the generator's own images at 1x/2x/4x, and able to say no."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from PIL import Image, ImageFilter

from attnsurgery.reference.evaluator import connected_components, detect, score, summarize
from attnsurgery.reference.shapes import PALETTE, Scene, ShapeObject, make_scene, render


@pytest.mark.parametrize(("size", "count"), [(64, 150), (128, 50), (256, 15)])
def test_self_check_on_fresh_images(size: int, count: int) -> None:
    scores = [score(render(s, size), s.caption) for s in (make_scene(7_000_000 + i) for i in range(count))]
    metrics = summarize(scores)
    assert metrics.fidelity >= 0.99
    assert metrics.duplication_rate == 0.0
    assert metrics.clean_shape_rate >= 0.95


def test_survives_blur_and_noise() -> None:
    """Generated images have soft edges and colour noise; the evaluator must still read them."""
    rng = np.random.default_rng(0)
    scores = []
    for i in range(60):
        scene = make_scene(8_000_000 + i)
        blurred = np.asarray(Image.fromarray(render(scene, 64)).filter(ImageFilter.GaussianBlur(0.8)), float)
        noisy = np.clip(blurred + rng.normal(0, 8, blurred.shape), 0, 255).astype(np.uint8)
        scores.append(score(noisy, scene.caption))
    assert summarize(scores).fidelity >= 0.95


def _scene(*objects: ShapeObject) -> Scene:
    return Scene(0, 215, objects, "")


RED_CIRCLE = ShapeObject("red", "circle", 0.3, 0.3, 0.3)
BLUE_SQUARE = ShapeObject("blue", "square", 0.7, 0.7, 0.25)


def test_detects_wrong_colour_missing_and_duplicated_objects() -> None:
    prompt = "a red circle and a blue square"
    assert score(render(_scene(RED_CIRCLE, BLUE_SQUARE)), prompt).correct

    wrong_colour = score(render(_scene(RED_CIRCLE, ShapeObject("green", "square", 0.7, 0.7, 0.25))), prompt)
    assert not wrong_colour.correct and wrong_colour.extra_objects == 0

    wrong_shape = score(render(_scene(RED_CIRCLE, ShapeObject("blue", "triangle", 0.7, 0.7, 0.25))), prompt)
    assert not wrong_shape.correct

    missing = score(render(_scene(RED_CIRCLE)), prompt)
    assert not missing.correct and missing.extra_objects == 0

    duplicate = ShapeObject("red", "circle", 0.75, 0.25, 0.25)
    duplicated = score(render(_scene(RED_CIRCLE, BLUE_SQUARE, duplicate)), prompt)
    assert not duplicated.correct and duplicated.extra_objects == 1

    metrics = summarize([wrong_colour, missing, duplicated])
    assert metrics.fidelity == 0.0
    assert metrics.duplication_rate == pytest.approx(1 / 3)
    assert metrics.mean_extra_objects == pytest.approx(1 / 3)


def test_a_fringe_of_another_hue_is_not_an_object() -> None:
    """Decoded edges can ring an object with a neighbouring hue; the ring sits inside the object's box."""
    image = render(_scene(ShapeObject("orange", "circle", 0.5, 0.5, 0.32)), 64)
    inner = render(_scene(ShapeObject("red", "circle", 0.5, 0.5, 0.25)), 64)
    red = np.all(inner == PALETTE["red"], axis=-1)
    image[red] = PALETTE["red"]
    assert [(d.colour, d.shape) for d in detect(image)] == [("red", "circle")]


def test_blank_and_off_palette_images_hold_no_objects() -> None:
    assert detect(np.full((64, 64, 3), 220, np.uint8)) == []
    grey_square = render(_scene(BLUE_SQUARE))
    grey_square[np.all(grey_square == PALETTE["blue"], axis=-1)] = (120, 120, 120)
    assert detect(grey_square) == []


def test_shape_is_read_from_fill_ratio() -> None:
    for shape in ("circle", "square", "triangle"):
        (found,) = detect(render(_scene(ShapeObject("purple", shape, 0.5, 0.5, 0.3)), 128))
        assert (found.colour, found.shape, found.clean) == ("purple", shape, True)


def test_accepts_pil_float_and_tensor_images() -> None:
    import torch

    image = render(_scene(RED_CIRCLE), 64)
    as_float = image.astype(np.float32) / 255
    variants = [Image.fromarray(image), as_float, torch.from_numpy(as_float).permute(2, 0, 1)]
    assert all([(d.colour, d.shape) for d in detect(v)] == [("red", "circle")] for v in variants)
    with pytest.raises(ValueError, match="RGB image"):
        detect(np.zeros((64, 64)))
    with pytest.raises(ValueError, match="names no object"):
        score(image, "a photo of a cat")


def _bfs_components(mask: np.ndarray) -> list[set[tuple[int, int]]]:
    """Plain breadth-first 8-connected components: the obvious reference."""
    seen = np.zeros_like(mask)
    found = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        queue, part = deque([start]), set()
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            part.add((int(y), int(x)))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    inside = 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]
                    if inside and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        found.append(part)
    return found


def test_connected_components_match_breadth_first_search() -> None:
    rng = np.random.default_rng(1)
    for _ in range(10):
        mask = rng.random((30, 41)) < 0.45
        labels = connected_components(mask)
        ours = [set(zip(*np.nonzero(labels == i), strict=True)) for i in np.unique(labels[labels > 0])]
        ours = [{(int(y), int(x)) for y, x in part} for part in ours]
        reference = _bfs_components(mask)
        assert len(reference) > 5
        assert sorted(map(sorted, ours)) == sorted(map(sorted, reference))
