"""Base for processors that wrap an attention layer's current processor instead of replacing it.

Wrapping keeps whatever the model's own processor does (LoRA scales, qk_norm, RoPE, IP-Adapter, fused
projections, the attention backend) and lets several plugins stack on one layer.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch

__all__ = ["WrappingProcessor", "innermost"]


class WrappingProcessor:
    """A processor holding ``inner`` (the processor it replaced) and delegating to it by default.

    diffusers filters the keyword arguments it passes to a processor by the parameter names of
    ``processor.__call__``. A wrapper with a generic ``**kwargs`` signature would make diffusers drop
    ``temb``, ``ip_adapter_masks`` and friends before they reach ``inner``, so each instance exposes the
    inner processor's parameters for that inspection. It does so through its class (a subclass of the same
    name per parameter list, made once), not an instance ``__call__``: dynamo traces calls of an object only
    through its class, so a compiled denoiser runs the wrapper inside its graph.

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
        shown = type(inner).__call__
        if not isinstance(shown, types.FunctionType):
            raise TypeError(
                f"inner processor {type(inner).__name__} must define __call__ as a Python function (diffusers reads "
                f"its parameters), got {type(shown).__name__}"
            )
        self.inner = inner
        self.__class__ = _exposing(getattr(type(self), "_exposes_for", type(self)), shown)

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


@functools.cache
def _exposing(cls: type, shown: types.FunctionType) -> type:
    """``cls`` with a ``__call__`` that runs ``cls.__call__`` and shows the parameters of ``shown`` (the inner
    processor's class ``__call__``, with its ``self``) to ``inspect.signature``."""
    call = cls.__call__

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        return call(self, *args, **kwargs)

    # inspect.signature follows __wrapped__ (down a chain of wrappers) and reads the parameters from the code. A
    # __signature__ object would do in eager, but dynamo refuses to read its parameters (a mapping proxy) once the
    # graph mutated a dict, as diffusers' LoRA-scale wrapper does with FLUX's joint_attention_kwargs.
    __call__.__wrapped__ = shown  # type: ignore[attr-defined]
    namespace = {"__call__": __call__, "_exposes_for": cls, "__module__": cls.__module__, "__doc__": cls.__doc__}
    exposing = type(cls.__name__, (cls,), namespace)
    exposing.__qualname__ = cls.__qualname__
    return exposing
