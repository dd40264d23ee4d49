"""Analytic evaluator of the reference world: which coloured shapes are in an image, no learned model.

Pixels are assigned to the nearest palette colour when it is close (``COLOUR_THRESHOLD``) and closer
than the background (the median border colour); blur and background fall out. Each colour's connected
components above a minimum area are objects; an object's shape follows from how much of its bounding
box it fills (square ~1.0, circle ~pi/4, triangle ~0.5) and its aspect ratio. Scenes never overlap
objects' boxes, so a component inside a larger object's box is that object's fringe and is dropped.

Example:
    >>> from attnsurgery.reference.shapes import make_scene, render
    >>> scene = make_scene(0)
    >>> score(render(scene, 64), scene.caption).correct
    True
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from attnsurgery.reference.shapes import PALETTE, parse_caption

#: Largest RGB distance from a palette colour still counted as that colour (palette colours are >= 90
#: apart; a 50/50 blend of an object with the grey background is ~130 from either).
COLOUR_THRESHOLD = 70.0
#: Bounding-box fill ratio of each shape template (triangle: half the box; circle: pi / 4).
SHAPE_FILL = {"triangle": 0.5, "circle": math.pi / 4, "square": 1.0}
#: Fill-ratio boundaries between the shapes: triangle < 0.66 <= circle < 0.86 <= square. Not the midpoints
#: of the templates: rasterised circles at 64 px fill 0.71-0.85, and soft edges round a square's corners
#: (blurred small squares fill ~0.87) while filling out a triangle's (~0.64).
TRIANGLE_CIRCLE_FILL, CIRCLE_SQUARE_FILL = 0.66, 0.86
#: A detection matches its template "confidently" within this fill distance and aspect range.
CLEAN_FILL_TOLERANCE = 0.08
CLEAN_ASPECT_RANGE = (0.8, 1.25)
#: Components smaller than side^2 / MIN_AREA_DIVISOR pixels are specks, not objects (16 px at 64 px;
#: the smallest real object, a triangle of side S/5, covers ~S^2 / 50).
MIN_AREA_DIVISOR = 256

_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.array([PALETTE[c] for c in _PALETTE_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Detection:
    """One object found in an image; ``bbox`` is (top, left, height, width) in pixels."""

    colour: str
    shape: str
    area: int
    bbox: tuple[int, int, int, int]
    fill: float
    aspect: float

    @property
    def clean(self) -> bool:
        """Whether the object matches its shape template confidently."""
        low, high = CLEAN_ASPECT_RANGE
        return abs(self.fill - SHAPE_FILL[self.shape]) <= CLEAN_FILL_TOLERANCE and low <= self.aspect <= high


@dataclass(frozen=True)
class SampleScore:
    """The evaluator's verdict on one image against its prompt."""

    prompt: str
    expected: Counter[tuple[str, str]]
    detections: tuple[Detection, ...]

    @property
    def detected(self) -> Counter[tuple[str, str]]:
        return Counter((d.colour, d.shape) for d in self.detections)

    @property
    def correct(self) -> bool:
        """The detected multiset of (colour, shape) equals the prompt's."""
        return self.detected == self.expected

    @property
    def extra_objects(self) -> int:
        """How many more objects than the prompt asks for (0 when fewer or equal)."""
        return max(0, len(self.detections) - sum(self.expected.values()))


@dataclass(frozen=True)
class Metrics:
    """Quality over a set of samples (definitions in docs/techniques/reference-world.md)."""

    samples: int
    fidelity: float
    duplication_rate: float
    mean_extra_objects: float
    clean_shape_rate: float  # NaN when no object was detected at all

    def as_dict(self) -> dict[str, float | int]:
        return {
            "samples": self.samples,
            "fidelity": self.fidelity,
            "duplication_rate": self.duplication_rate,
            "mean_extra_objects": self.mean_extra_objects,
            "clean_shape_rate": self.clean_shape_rate,
        }


def as_rgb_array(image: np.ndarray | Image.Image | torch.Tensor) -> np.ndarray:
    """``[H, W, 3]`` float32 in 0..255 from a PIL image, a uint8/float HWC array or a CHW tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3] (or a CHW tensor), got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32)
    return np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0


def colour_labels(image: np.ndarray | Image.Image | torch.Tensor) -> np.ndarray:
    """Per-pixel palette index ``[H, W]`` (int), -1 for background, blur and anything off-palette."""
    rgb = as_rgb_array(image)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    palette_distance = np.linalg.norm(rgb[:, :, None, :] - _PALETTE_RGB, axis=-1)  # [H, W, colours]
    nearest = palette_distance.argmin(axis=-1)
    best = palette_distance.min(axis=-1)
    background_distance = np.linalg.norm(rgb - background, axis=-1)
    keep = (best <= COLOUR_THRESHOLD) & (best < background_distance)
    return np.where(keep, nearest, -1)


def connected_components(mask: np.ndarray) -> np.ndarray:
    """8-connected component ids ``[H, W]`` of a boolean mask (0 outside it).

    Each pixel takes the smallest pixel index among its neighbours, then follows those pointers
    (pointer jumping), so a component settles in a few rounds instead of one round per pixel of width.
    """
    height, width = mask.shape
    outside = height * width
    labels = np.where(mask, np.arange(outside).reshape(height, width), outside)
    while True:
        padded = np.pad(labels, 1, constant_values=outside)
        shifted = [padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)]
        hooked = np.where(mask, np.minimum.reduce(shifted), outside).ravel()
        lookup = np.append(hooked, outside)
        while True:
            jumped = lookup[lookup[:-1]]
            if np.array_equal(jumped, lookup[:-1]):
                break
            lookup[:-1] = jumped
        new_labels = lookup[:-1].reshape(height, width)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
    _, ids = np.unique(labels, return_inverse=True)
    ids = ids.reshape(height, width) + 1
    return np.where(mask, ids, 0)


def _classify(colour: str, ys: np.ndarray, xs: np.ndarray) -> Detection:
    top, left = int(ys.min()), int(xs.min())
    height, width = int(ys.max()) - top + 1, int(xs.max()) - left + 1
    fill = len(ys) / (height * width)
    shape = "triangle" if fill < TRIANGLE_CIRCLE_FILL else "circle" if fill < CIRCLE_SQUARE_FILL else "square"
    return Detection(colour, shape, len(ys), (top, left, height, width), fill, width / height)


def detect(image: np.ndarray | Image.Image | torch.Tensor) -> list[Detection]:
    """The objects in ``image``, largest first.

    Args:
        image: PIL image, ``[H, W, 3]`` uint8 or float in [0, 1] array, or ``[3, H, W]`` tensor in [0, 1].
    """
    labels = colour_labels(image)
    min_area = max(4, labels.shape[0] * labels.shape[1] // MIN_AREA_DIVISOR)
    found = []
    for index in np.unique(labels[labels >= 0]):
        components = connected_components(labels == index)
        ids, counts = np.unique(components[components > 0], return_counts=True)
        for component in ids[counts >= min_area]:
            ys, xs = np.nonzero(components == component)
            found.append(_classify(_PALETTE_NAMES[index], ys, xs))
    return _drop_fringes(sorted(found, key=lambda d: -d.area))


def _overlap(a: Detection, b: Detection) -> bool:
    (ay, ax, ah, aw), (by, bx, bh, bw) = a.bbox, b.bbox
    return ay < by + bh and by < ay + ah and ax < bx + bw and bx < ax + aw


def _drop_fringes(detections: list[Detection]) -> list[Detection]:
    """Drop components whose bounding box overlaps a larger object's (largest first).

    Scenes never overlap objects' boxes, so such a component is a fringe of another hue that soft,
    decoded edges leave around an object (a red disc ringed with orange), not an object of its own.
    """
    kept: list[Detection] = []
    for detection in detections:
        if not any(_overlap(detection, bigger) for bigger in kept):
            kept.append(detection)
    return kept


def score(image: np.ndarray | Image.Image | torch.Tensor, prompt: str) -> SampleScore:
    """Compare what ``image`` shows with what ``prompt`` asks for.

    Example:
        >>> blank = np.full((64, 64, 3), 220, dtype=np.uint8)
        >>> score(blank, "a red circle").correct
        False
    """
    expected = parse_caption(prompt)
    if not expected:
        raise ValueError(
            f"prompt {prompt!r} names no object the evaluator knows; write it like 'a red circle' with "
            f"colours {sorted(PALETTE)} and shapes {sorted(SHAPE_FILL)}"
        )
    return SampleScore(prompt, expected, tuple(detect(image)))


def summarize(scores: Iterable[SampleScore]) -> Metrics:
    """Fidelity, duplication rate, mean extra objects and clean-shape rate over ``scores``."""
    scores = list(scores)
    if not scores:
        raise ValueError("summarize needs at least one scored sample")
    detections = [d for s in scores for d in s.detections]
    return Metrics(
        samples=len(scores),
        fidelity=float(np.mean([s.correct for s in scores])),
        duplication_rate=float(np.mean([s.extra_objects > 0 for s in scores])),
        mean_extra_objects=float(np.mean([s.extra_objects for s in scores])),
        clean_shape_rate=float(np.mean([d.clean for d in detections])) if detections else math.nan,
    )
