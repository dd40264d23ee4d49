"""The plugin protocol: a frozen, validated config that knows how to attach itself to a surgery."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ..surgery import Surgery

__all__ = ["Plugin", "plugin_from_dict"]

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
