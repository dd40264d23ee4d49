"""Private random streams: a ``torch.Generator`` seeded from a seed and a key, never the global RNG.

Keys (a layer, a step, a sigma) give every random choice its own reproducible stream without shared state,
so a run draws the same numbers whatever ran before it. The diffusers plugins (through
:meth:`attnsurgery.surgery.Surgery.generator`) and the ComfyUI nodes draw from here.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["keyed_seed", "keyed_generator"]


def keyed_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed from ``seed`` and ``keys``: a digest of their ``repr``, the same in every process."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def keyed_generator(seed: int, *keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh generator on ``device`` seeded by :func:`keyed_seed` of ``seed`` and ``keys``.

    Example:
        >>> a = torch.rand(3, generator=keyed_generator(0, "down_blocks.0", 4))
        >>> torch.equal(a, torch.rand(3, generator=keyed_generator(0, "down_blocks.0", 4)))
        True
    """
    return torch.Generator(device=device).manual_seed(keyed_seed(seed, *keys))
