"""The plugin protocol: a frozen, validated config that knows how to attach itself to a surgery."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ..surgery import Surgery

__all__ = ["Plugin", "plugin_from_dict", "check_number", "normalize_layers"]

P = TypeVar("P", bound="Plugin")

_REGISTRY: dict[str, type[Plugin]] = {}


@dataclasses.dataclass(frozen=True)
class Plugin:
    """Base of every attnsurgery plugin.

    Subclasses are ``@dataclass(frozen=True)``, validate their fields in ``__post_init__`` (raising
    ``ValueError`` that names the field, the value and the fix) and implement :meth:`attach`, making every
    change through the surgery's recording API so that ``remove()`` can undo it. ``apply`` never mutates
    a plugin: presets resolved for a model live in the processors, not on the config.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    def attach(self, surgery: Surgery) -> None:
        """Make this plugin's changes on ``surgery`` (processor swaps, module swaps, hooks)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement attach()")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict with a ``type`` key; ``plugin_from_dict`` inverts it."""
        data = {"type": type(self).__name__}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            data[field.name] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_dict(cls: type[P], data: dict[str, Any]) -> P:
        """Rebuild a plugin of this class from ``to_dict`` output (unknown keys are an error)."""
        data = {k: v for k, v in data.items() if k != "type"}
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)


def plugin_from_dict(data: dict[str, Any]) -> Plugin:
    """Rebuild any registered plugin from its ``to_dict`` output."""
    kind = data.get("type")
    if kind not in _REGISTRY:
        raise ValueError(f"unknown plugin type {kind!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[kind].from_dict(data)


def check_number(owner: str, name: str, value: Any, low: float, high: float, hint: str) -> None:
    """Refuse anything but a finite real number in [low, high], naming the field and the fix.

    Bools and strings are refused before any comparison (``"0.5" <= 1`` is a TypeError, ``True`` passes
    as 1), and so are nan (it fails every comparison, so range checks alone let it through) and inf.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise ValueError(f"{owner} {name}={value!r} is invalid; use {hint}")


def normalize_layers(plugin: Plugin, layers: Any) -> None:
    """Check a layer selector's type and store a list of them as a tuple, so the frozen config stays hashable.

    Selectors are only resolved against a model at ``apply``; a wrong type would fail there with a bare
    TypeError, so it is refused here.
    """
    items = [layers] if isinstance(layers, str) else layers
    if not isinstance(items, Sequence) or not items or not all(isinstance(item, str) for item in items):
        raise ValueError(
            f"{type(plugin).__name__} layers={layers!r} is invalid; use a layer selector string (a path, glob or "
            "group such as 'top') or a list of them"
        )
    if not isinstance(layers, str):
        object.__setattr__(plugin, "layers", tuple(layers))
