"""Intercept the attention call made *inside* a model's own attention processor.

Wrapping the processor keeps its semantics (qk_norm, RoPE, SD3.5's dual attention, IP-Adapter, LoRA):
we do not re-implement it, we only post-process the result of its `F.scaled_dot_product_attention` call.
The interception is a `TorchFunctionMode` entered around the one processor call, so nothing global is
patched: it is thread-local, scoped to that call and undone in `finally` by the `with` block. It sees
direct SDPA calls (AttnProcessor2_0, JointAttnProcessor2_0) and diffusers' native attention backend
(`dispatch_attention_fn`, used by FluxAttnProcessor and friends) alike, always as [batch, heads, tokens, dim];
under another diffusers backend, `attention_backend.layer_backend_route` makes the call native and computes it
with the chosen backend.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# (q, k, v, out, call) -> new out; `call` holds the bound SDPA arguments (attn_mask, scale, ...).
Tensor = torch.Tensor
AttentionEdit = Callable[[Tensor, Tensor, Tensor, Tensor, dict[str, Any]], Tensor]
# (q, k, v, call) -> out: computes the attention in place of SDPA.
AttentionCompute = Callable[[Tensor, Tensor, Tensor, dict[str, Any]], Tensor]


def sdpa_arguments(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
) -> dict[str, Any]:
    """An SDPA call's arguments by name, defaults filled in: call it as SDPA was called, ``sdpa_arguments(*args,
    **kwargs)``. Python binds them (an ``inspect.Signature.bind`` would stop dynamo in a graph that mutated a dict)."""
    return dict(
        query=query,
        key=key,
        value=value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )


def pass_through(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """Run a call a mode does not handle, as it was made.

    ``Tensor.unflatten`` (FLUX's processors split heads with it) is the one Tensor method torch defines in Python
    with a ``super()`` call; dynamo (2.13) inlines a Python method a mode passes on and cannot trace that
    ``super()``. Called as a method of the tensor it is the same call (the mode is off inside its handler), and
    dynamo puts it in the graph directly.
    """
    if func is Tensor.unflatten:
        return args[0].unflatten(*args[1:], **kwargs)
    return func(*args, **kwargs)


_ACTIVE = threading.local()


def _active_modes() -> list[_AttentionMode]:
    """Our modes entered on this thread, outermost first (each processor wrapper enters one)."""
    if not hasattr(_ACTIVE, "modes"):
        _ACTIVE.modes = []
    return _ACTIVE.modes


@contextmanager
def _muted(modes: list[_AttentionMode]) -> Iterator[None]:
    """Let SDPA calls pass these modes untouched (an op computing attention must not be edited itself)."""
    for mode in modes:
        mode.muted += 1
    try:
        yield
    finally:
        for mode in modes:
            mode.muted -= 1


class _AttentionMode(TorchFunctionMode):
    """Base of the interception modes: counts SDPA calls and keeps track of the modes below it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.muted = 0

    def __enter__(self):
        _active_modes().append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _active_modes().remove(self)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or self.muted:
            return pass_through(func, args, kwargs)
        self.calls += 1
        if self.calls > 1:
            return func(*args, **kwargs)
        arguments = sdpa_arguments(*args, **kwargs)
        q, k, v = arguments.pop("query"), arguments.pop("key"), arguments.pop("value")
        return self._first_call(func, q, k, v, arguments)

    def _first_call(self, func, q: Tensor, k: Tensor, v: Tensor, call: dict[str, Any]) -> Tensor:
        raise NotImplementedError


class FirstAttentionCall(_AttentionMode):
    """Apply `edit` to the output of the first SDPA call made while this mode is active.

    Only the first call is edited: later calls inside the same processor call are IP-Adapter or other
    auxiliary attentions over different keys (e.g. SD3IPAdapterJointAttnProcessor2_0), which the
    perturbation must leave alone. `calls` counts every SDPA call, so the caller can fail loudly when the
    processor attended without one (a processor computing attention itself).

    Example:
        >>> q = torch.randn(1, 2, 4, 8)
        >>> with FirstAttentionCall(lambda q, k, v, out, call: v) as mode:
        ...     out = F.scaled_dot_product_attention(q, q, q)
        >>> torch.equal(out, q), mode.calls
        (True, 1)
    """

    def __init__(self, edit: AttentionEdit) -> None:
        super().__init__()
        self.edit = edit

    def _first_call(self, func, q: Tensor, k: Tensor, v: Tensor, call: dict[str, Any]) -> Tensor:
        # The mode is off inside its own handler, so the edit's SDPA calls are not intercepted by it.
        return self.edit(q, k, v, func(q, k, v, **call), call)


class ReplacedAttentionCall(_AttentionMode):
    """Compute the first SDPA call made while this mode is active with ``compute`` instead of SDPA.

    The dense call never runs (what local attention saves). An edit of a :class:`FirstAttentionCall`
    entered around this mode (head-level perturbation wrapping a local-attention layer) still sees the
    layer's attention, now the replaced one: ``compute`` runs with those outer modes muted, then their
    edits are applied to its result, nearest first, as if SDPA had returned it.

    Example:
        >>> q = torch.randn(1, 2, 4, 8)
        >>> with ReplacedAttentionCall(lambda q, k, v, call: 2 * v) as mode:
        ...     out = F.scaled_dot_product_attention(q, q, q)
        >>> torch.equal(out, 2 * q), mode.calls
        (True, 1)
    """

    def __init__(self, compute: AttentionCompute) -> None:
        super().__init__()
        self.compute = compute

    def _first_call(self, func, q: Tensor, k: Tensor, v: Tensor, call: dict[str, Any]) -> Tensor:
        modes = _active_modes()
        outer = [m for m in modes[: modes.index(self)] if m.calls == 0 and not m.muted]
        with _muted(outer):
            out = self.compute(q, k, v, call)
        for mode in reversed(outer):
            mode.calls += 1
            if isinstance(mode, FirstAttentionCall):
                with _muted([mode]):
                    out = mode.edit(q, k, v, out, call)
        return out
