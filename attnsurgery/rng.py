"""Private random streams: a ``torch.Generator`` seeded from a seed and a key, never the global RNG.

Keys (a layer, a step, a sigma) give every random choice its own reproducible stream without shared state,
so a run draws the same numbers whatever ran before it. The diffusers plugins (through
:meth:`attnsurgery.surgery.Surgery.generator` and :meth:`~attnsurgery.surgery.Surgery.call_seed`) and the
ComfyUI nodes draw from here.

Inside a denoiser that may be compiled, a draw cannot build a generator (dynamo cannot trace one, nor the
hash of the key): the key is hashed before the call, outside the graph, into a :class:`CallInt` seed tensor, and
:func:`seeded_randint` draws from it inside an opaque op, so compiled and eager runs draw the same numbers
and a new step changes a tensor's value, not the graph.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

__all__ = ["keyed_seed", "keyed_generator", "CallInt", "seeded_randint"]


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


class CallInt:
    """An integer chosen per denoiser call (a seed, a random window shift), as a 0-d int64 tensor in ``value``.

    ``refresh()`` runs before every denoiser call, outside any compiled graph (the surgery's per-call hook);
    the graph reads ``value`` as an input, so its new value each step costs no recompile.

    Args:
        of_call: this call's integer (e.g. :func:`keyed_seed` of the plugin's seed, the layer and the step).
    """

    def __init__(self, of_call: Callable[[], int]) -> None:
        self._of_call = of_call
        self.value = torch.zeros((), dtype=torch.int64)

    def refresh(self) -> None:
        """Recompute ``value`` for the call about to run."""
        self.value = torch.tensor(self._of_call(), dtype=torch.int64)


@torch.library.custom_op("attnsurgery::seeded_randint", mutates_args=())
def seeded_randint(seed: torch.Tensor, high: int, size: Sequence[int]) -> torch.Tensor:
    """``torch.randint(high, size)`` on the CPU from a fresh generator seeded with ``seed`` (0-d int64).

    An opaque op, so it runs unchanged inside compiled graphs: the same numbers as
    ``torch.randint(high, size, generator=torch.Generator().manual_seed(int(seed)))``.

    Example:
        >>> seed = torch.tensor(keyed_seed(0, "layer", 3))
        >>> torch.equal(seeded_randint(seed, 4, [3]), torch.randint(4, (3,), generator=keyed_generator(0, "layer", 3)))
        True
    """
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randint(high, tuple(size), generator=generator)


@seeded_randint.register_fake
def _(seed: torch.Tensor, high: int, size: Sequence[int]) -> torch.Tensor:
    return torch.empty(tuple(size), dtype=torch.int64)
