"""The shapes generator: deterministic, within its stated ranges, captions that say what is drawn."""

from __future__ import annotations

import numpy as np
import pytest

from attnsurgery.reference.shapes import (
    HELDOUT_SEED_BASE,
    MAX_SIZE,
    MIN_SIZE,
    PALETTE,
    heldout_seed,
    make_scene,
    parse_caption,
    render,
)


def test_same_seed_same_scene_and_pixels() -> None:
    assert make_scene(123) == make_scene(123)
    assert np.array_equal(render(make_scene(123), 64), render(make_scene(123), 64))
    captions = {make_scene(s).caption for s in range(40)}
    assert len(captions) > 30  # different seeds really give different scenes


@pytest.mark.parametrize("num_objects", [1, 2, 3])
def test_scene_ranges_and_caption(num_objects: int) -> None:
    for seed in range(60):
        scene = make_scene(seed, num_objects)
        assert len(scene.objects) == num_objects
        assert len({o.colour for o in scene.objects}) == num_objects
        assert all(MIN_SIZE <= o.size <= MAX_SIZE for o in scene.objects)
        for o in scene.objects:
            assert o.size / 2 <= min(o.cx, o.cy) and max(o.cx, o.cy) <= 1 - o.size / 2
        assert parse_caption(scene.caption) == scene.expected


def test_objects_do_not_touch_and_keep_their_colour() -> None:
    """Every object's colour covers roughly its own area: nothing is hidden by an overlap."""
    for seed in range(40):
        scene = make_scene(seed, 3)
        image = render(scene, 128)
        for obj in scene.objects:
            pixels = np.all(image == PALETTE[obj.colour], axis=-1).sum()
            box = (obj.size * 128) ** 2
            assert 0.4 * box < pixels <= 1.05 * box, (scene.caption, obj)


def test_larger_renders_show_the_same_scene() -> None:
    scene = make_scene(5, 2)
    small, large = render(scene, 64), render(scene, 256)
    assert large.shape == (256, 256, 3)
    downsampled = large.reshape(64, 4, 64, 4, 3)[:, 0, :, 0]
    assert np.mean(np.any(downsampled != small, axis=-1)) < 0.05


def test_positions_in_captions_are_true() -> None:
    seen = 0
    for seed in range(300):
        scene = make_scene(seed, 1)
        obj = scene.objects[0]
        if "on the left" in scene.caption:
            assert obj.cx < 1 / 3
            seen += 1
        if "at the bottom" in scene.caption:
            assert obj.cy > 2 / 3
            seen += 1
    assert seen > 5


def test_heldout_seeds_are_outside_the_training_range() -> None:
    assert heldout_seed(0) == HELDOUT_SEED_BASE
    assert heldout_seed(10) > heldout_seed(9)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="num_objects"):
        make_scene(0, 4)
    with pytest.raises(ValueError, match="at least 16"):
        render(make_scene(0), 8)


def test_parse_caption_reads_plural_and_case() -> None:
    assert parse_caption("A Red Circle and two blue squares") == {("red", "circle"): 1, ("blue", "square"): 1}
    assert parse_caption("a cat") == {}
