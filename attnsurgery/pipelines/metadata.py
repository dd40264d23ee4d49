"""Generation parameters stored inside PNG files, so an image carries the recipe that made it.

Two text chunks: ``parameters`` in the A1111 style many tools read, and ``attnsurgery`` with the full
JSON (model, prompts, sampler settings and every plugin's ``to_dict``) that ``--from-png`` replays.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

__all__ = ["GenerationParams", "save_png", "read_png_params"]

JSON_KEY = "attnsurgery"


@dataclass(frozen=True)
class GenerationParams:
    """Everything needed to reproduce one image."""

    prompt: str
    model: str = "reference"
    negative_prompt: str = ""
    steps: int = 20
    cfg: float | None = None  # None: the model's own (``default_guidance_scale``), filled in by ``generate``
    height: int | None = None
    width: int | None = None
    seed: int = 0
    plugins: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def a1111_text(self) -> str:
        """The ``parameters`` chunk in the format A1111-style tools parse."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        size = f", Size: {self.width}x{self.height}" if self.height and self.width else ""
        plugins = ", ".join(p.get("type", "?") for p in self.plugins)
        extra = f", attnsurgery: {plugins}" if plugins else ""
        lines.append(f"Steps: {self.steps}, CFG scale: {self.cfg}, Seed: {self.seed}{size}, Model: {self.model}{extra}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "plugins": list(self.plugins)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GenerationParams:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown generation parameter(s) {unknown} in PNG metadata")
        data["plugins"] = tuple(data.get("plugins", ()))
        return cls(**data)


def save_png(image: Image.Image, path: str | Path, params: GenerationParams) -> Path:
    """Write ``image`` with both metadata chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", params.a1111_text())
    info.add_text(JSON_KEY, params.to_json())
    path = Path(path)
    image.save(path, pnginfo=info)
    return path


def read_png_params(path: str | Path) -> GenerationParams:
    """Read the parameters that ``save_png`` stored.

    Raises:
        ValueError: the PNG carries no attnsurgery metadata.
    """
    with Image.open(path) as image:
        text = image.text.get(JSON_KEY) if hasattr(image, "text") else None
    if text is None:
        raise ValueError(f"{path} carries no attnsurgery generation parameters (was it made by attnsurgery generate?)")
    return GenerationParams.from_json(text)
