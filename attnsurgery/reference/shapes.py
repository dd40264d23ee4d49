"""Procedural captioned shapes: the reference world's data, deterministic from a seed.

A scene is 1-3 flat-coloured objects (circle, square, triangle) on a plain light-grey background. It is
described in fractions of the image side, so one scene renders at any size ``S`` (native 64 px) and the
2x / 4x renders show the same picture. Objects in one scene have distinct colours and never touch,
which keeps the analytic evaluator exact on the data itself.

Example:
    >>> scene = make_scene(7)
    >>> scene.caption
    'a red square, a green triangle and a yellow triangle at the bottom'
    >>> render(scene, 64).shape
    (64, 64, 3)
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

#: Well-separated, saturated hues (RGB 0-255). Far from each other and from the light-grey background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 190),
    "orange": (250, 130, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Object size (bounding-box side) as a fraction of the image side: S/5 .. S/3.
MIN_SIZE, MAX_SIZE = 1 / 5, 1 / 3
#: Largest object size per object count, per object scale. "fixed" is the spec's S/5 .. S/3. "multi" lets
#: lone objects grow to 0.6 S, so a model learns to draw one object at many pixel sizes: without that it
#: cannot draw the larger object a 2x canvas asks for, whatever HiDiffusion does to its composition.
OBJECT_SCALES: dict[str, dict[int, float]] = {
    "fixed": {1: MAX_SIZE, 2: MAX_SIZE, 3: MAX_SIZE},
    "multi": {1: 0.6, 2: 0.45, 3: MAX_SIZE},
}
#: Background grey level range (0-255), "random light grey".
BACKGROUND_RANGE = (195, 235)
#: Empty space kept between objects, as a fraction of the side (2 px at 64 px).
MIN_GAP = 2 / 64
#: Evaluation seeds start here; training draws scene seeds below it, so the two never meet.
HELDOUT_SEED_BASE = 2**40
#: Probability that an object's caption names its position, when its position is unambiguous.
POSITION_PROB = 0.3

_OBJECT_RE = re.compile(r"\b(" + "|".join(PALETTE) + r")\s+(" + "|".join(SHAPES) + r")s?\b")


@dataclass(frozen=True)
class ShapeObject:
    """One object, in fractions of the image side; ``size`` is the bounding-box side."""

    colour: str
    shape: str
    cx: float
    cy: float
    size: float

    @property
    def position(self) -> str | None:
        """The region word a caption may use ("on the left", ...), or None when it is central."""
        if self.cx < 1 / 3:
            return "on the left"
        if self.cx > 2 / 3:
            return "on the right"
        if self.cy < 1 / 3:
            return "at the top"
        if self.cy > 2 / 3:
            return "at the bottom"
        return None


@dataclass(frozen=True)
class Scene:
    """A captioned scene: what to draw and what the caption asks for."""

    seed: int
    background: int
    objects: tuple[ShapeObject, ...]
    caption: str

    @property
    def expected(self) -> Counter[tuple[str, str]]:
        """The multiset of (colour, shape) the caption asks for."""
        return Counter((o.colour, o.shape) for o in self.objects)


def parse_caption(caption: str) -> Counter[tuple[str, str]]:
    """The multiset of (colour, shape) a caption names, e.g. ``"a red circle and a blue square"``.

    Works on any prompt written in the grammar's words; words outside it are ignored.
    """
    return Counter(_OBJECT_RE.findall(caption.lower()))


def _place(rng: np.random.Generator, placed: list[ShapeObject], colour: str, max_size: float) -> ShapeObject | None:
    """Try a few random placements; None when the image is too full for this object."""
    for _ in range(50):
        size = float(rng.uniform(MIN_SIZE, max_size))
        half = size / 2
        cx, cy = (float(v) for v in rng.uniform(half + MIN_GAP, 1 - half - MIN_GAP, size=2))
        clear = all(
            abs(cx - o.cx) >= half + o.size / 2 + MIN_GAP or abs(cy - o.cy) >= half + o.size / 2 + MIN_GAP
            for o in placed
        )
        if clear:
            return ShapeObject(colour, str(rng.choice(SHAPES)), cx, cy, size)
    return None


def _caption(rng: np.random.Generator, objects: list[ShapeObject]) -> str:
    """Caption from the grammar: "a red circle", "a red circle on the left and a blue square", ..."""
    phrases = []
    for obj in objects:
        article = "an" if obj.colour[0] in "aeiou" else "a"
        phrase = f"{article} {obj.colour} {obj.shape}"
        if obj.position is not None and rng.random() < POSITION_PROB:
            phrase += f" {obj.position}"
        phrases.append(phrase)
    if len(phrases) <= 2:
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def make_scene(seed: int, num_objects: int | None = None, scale: str = "fixed") -> Scene:
    """The scene for ``seed``: same seed, same scene, on every machine.

    Args:
        seed: any non-negative integer. Use ``heldout_seed(i)`` for evaluation scenes.
        num_objects: 1, 2 or 3; None draws it from the seed.
        scale: a key of ``OBJECT_SCALES``: the object size range.

    Example:
        >>> make_scene(3, num_objects=1).caption
        'an orange triangle at the top'
    """
    if num_objects is not None and num_objects not in (1, 2, 3):
        raise ValueError(f"num_objects must be 1, 2 or 3 (or None to draw it), got {num_objects!r}")
    if scale not in OBJECT_SCALES:
        raise ValueError(f"scale must be one of {tuple(OBJECT_SCALES)}, got {scale!r}")
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 4)) if num_objects is None else num_objects
    background = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1))
    colours = rng.permutation(list(PALETTE))[:count]
    objects: list[ShapeObject] = []
    for colour in colours:
        obj = _place(rng, objects, str(colour), OBJECT_SCALES[scale][count])
        if obj is None:  # too crowded: restart the whole scene from a derived seed, keeping determinism
            return replace(make_scene(int(rng.integers(0, 2**62)), count, scale), seed=seed)
        objects.append(obj)
    return Scene(seed, background, tuple(objects), _caption(rng, objects))


def heldout_seed(index: int) -> int:
    """The ``index``-th evaluation seed; disjoint from every seed training draws."""
    return HELDOUT_SEED_BASE + index


def _object_mask(obj: ShapeObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of ``obj`` over pixel-centre coordinates (in fractions of the side)."""
    half = obj.size / 2
    dx, dy = xs - obj.cx, ys - obj.cy
    if obj.shape == "circle":
        return dx * dx + dy * dy <= half * half
    if obj.shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # Upright triangle filling half of its bounding box: apex at the top centre, base at the bottom.
    depth = (dy + half) / obj.size  # 0 at the apex row, 1 at the base row
    return (depth >= 0) & (depth <= 1) & (np.abs(dx) <= depth * half)


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """Draw ``scene`` as a ``[size, size, 3]`` uint8 RGB array (hard edges)."""
    if size < 16:
        raise ValueError(f"size must be at least 16 px to hold the smallest object, got {size}")
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    xs, ys = np.meshgrid(coords, coords)
    image = np.full((size, size, 3), scene.background, dtype=np.uint8)
    for obj in scene.objects:
        image[_object_mask(obj, xs, ys)] = PALETTE[obj.colour]
    return image
