"""Intercept the attention call made *inside* a model's own attention processor.

Wrapping the processor keeps its semantics (qk_norm, RoPE, SD3.5's dual attention, IP-Adapter, LoRA):
we do not re-implement it, we only post-process the result of its `F.scaled_dot_product_attention` call.
The interception is a `TorchFunctionMode` entered around the one processor call, so nothing global is
patched: it is thread-local, scoped to that call and undone in `finally` by the `with` block. It sees
direct SDPA calls (AttnProcessor2_0, JointAttnProcessor2_0) and diffusers' native attention backend
(`dispatch_attention_fn`, used by FluxAttnProcessor and friends) alike, always as [batch, heads, tokens, dim].
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# (q, k, v, out, call) -> new out; `call` holds the bound SDPA arguments (attn_mask, scale, ...).
Tensor = torch.Tensor
AttentionEdit = Callable[[Tensor, Tensor, Tensor, Tensor, dict[str, Any]], Tensor]


def _sdpa_parameters(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
) -> None:
    """The parameters of F.scaled_dot_product_attention, to bind positional and keyword calls alike."""


_SDPA_SIGNATURE = inspect.signature(_sdpa_parameters)


class FirstAttentionCall(TorchFunctionMode):
    """Apply `edit` to the output of the first SDPA call made while this mode is active.

    Only the first call is edited: later calls inside the same processor call are IP-Adapter or other
    auxiliary attentions over different keys (e.g. SD3IPAdapterJointAttnProcessor2_0), which the
    perturbation must leave alone. `calls` counts every SDPA call, so the caller can fail loudly when the
    processor attended through a backend we cannot see (flash-attn, xformers, sage).

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
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is not F.scaled_dot_product_attention:
            return out
        self.calls += 1
        if self.calls > 1:
            return out
        call = _SDPA_SIGNATURE.bind(*args, **kwargs)
        call.apply_defaults()
        arguments = dict(call.arguments)
        # The mode is off inside its own handler, so the edit's SDPA calls are not intercepted.
        return self.edit(arguments.pop("query"), arguments.pop("key"), arguments.pop("value"), out, arguments)
