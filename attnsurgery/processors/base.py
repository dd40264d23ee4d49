"""Base for processors that wrap an attention layer's current processor instead of replacing it.

Wrapping keeps whatever the model's own processor does (LoRA scales, qk_norm, RoPE, IP-Adapter, fused
projections, the attention backend) and lets several plugins stack on one layer.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

__all__ = ["WrappingProcessor", "innermost"]


class WrappingProcessor:
    """A processor holding ``inner`` (the processor it replaced) and delegating to it by default.

    diffusers filters the keyword arguments it passes to a processor by the parameter names of
    ``processor.__call__``. A wrapper with a generic ``**kwargs`` signature would make diffusers drop
    ``temb``, ``ip_adapter_masks`` and friends before they reach ``inner``, so each instance exposes the
    inner processor's signature for that inspection.

    Subclasses override :meth:`__call__` and call ``self.inner(attn, hidden_states, *args, **kwargs)``.

    Example:
        >>> class Scaled(WrappingProcessor):
        ...     def __call__(self, attn, hidden_states, *args, **kwargs):
        ...         return 0.5 * self.inner(attn, hidden_states, *args, **kwargs)
        >>> wrapper = Scaled(layer.module.processor)
        >>> surgery.set_processor(layer, wrapper, role="heads") is wrapper.inner  # returns what it replaced
        True
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> WrappingProcessor:
        if not args and not kwargs:  # diffusers' class-only rebuild: say what to do instead of "missing 'inner'"
            raise TypeError(
                f"{cls.__name__} wraps a layer's own processor and cannot be built without one: diffusers' "
                "load_ip_adapter() and unload_ip_adapter() rebuild every processor from its class. Call remove() on "
                "the attnsurgery handle before that call, and apply the plugins again after it."
            )
        return super().__new__(cls)

    def __init__(self, inner: Any) -> None:
        if not callable(inner):
            raise TypeError(f"inner processor must be callable, got {type(inner).__name__}")
        self.inner = inner
        signature = inspect.signature(inner.__call__)
        self.__dict__["__call__"] = _SignatureView(self, signature)

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.inner(attn, hidden_states, *args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    # diffusers' set_attention_backend / reset_attention_backend set this on every processor that has it: passed
    # to the processor that attends, so a backend chosen after apply reaches it (and stays after remove()).
    # Absent (AttributeError) where the inner processor takes no backend, as on the unwrapped layer.
    @property
    def _attention_backend(self) -> Any:
        return self.inner._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, backend: Any) -> None:
        self.inner._attention_backend = backend


def innermost(processor: Any) -> Any:
    """The processor at the bottom of a chain of wrappers (the one that computes attention)."""
    while isinstance(processor, WrappingProcessor):
        processor = processor.inner
    return processor


class _SignatureView:
    """What ``wrapper.__call__`` looks like from outside: the wrapper's call with the inner signature."""

    def __init__(self, owner: WrappingProcessor, signature: inspect.Signature) -> None:
        self.__signature__ = signature
        self._owner = owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self._owner).__call__(self._owner, *args, **kwargs)
