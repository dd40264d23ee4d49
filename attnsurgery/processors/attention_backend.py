"""Keep the attention backend the user chose in diffusers on the layers our processors wrap.

diffusers' dispatch-style processors (FLUX, FLUX.2, Qwen-Image, Z-Image, Chroma) attend through
``dispatch_attention_fn``, with the backend set on the processor (``set_attention_backend``) or else the active
one (the ``attention_backend`` context manager). Only ``native`` and the ``_native_*`` backends end in
``F.scaled_dot_product_attention``, the call our processors intercept; flex, flash, sage or xformers call other
kernels. So around a wrapped call, :func:`layer_backend_route` lets the layer's own processor take the native
backend (the call we intercept, with the same arguments) and routes every SDPA call made meanwhile (the layer's
own, the replacement's, the perturbation's) through the backend the user chose, where that backend can run the
call (masks, dtype, device), else through torch's SDPA, logged once per reason. Under the native backend
nothing changes. U-Net and SD3 processors call torch's SDPA themselves: diffusers' backends never reach them.

Shapes: SDPA's ``[batch, heads, tokens, head_dim]``; diffusers' backends take ``[batch, tokens, heads, head_dim]``.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn
from torch.overrides import TorchFunctionMode

from .base import innermost
from .sdpa_intercept import pass_through, sdpa_arguments

__all__ = ["BackendRoute", "cannot_run", "layer_backend", "layer_backend_route"]

logger = logging.getLogger(__name__)

_NATIVE = AttentionBackendName.NATIVE
# Backends whose diffusers function takes a dense [batch, heads, queries, keys] mask (read in
# attention_dispatch.py, diffusers 0.42): flash, sage and the varlen kernels raise on one or take key padding only.
_DENSE_MASKS = frozenset(
    {
        _NATIVE,
        AttentionBackendName._NATIVE_MATH,
        AttentionBackendName._NATIVE_EFFICIENT,
        AttentionBackendName._NATIVE_CUDNN,
        AttentionBackendName.FLEX,
        AttentionBackendName.XFORMERS,
    }
)
_logged: set[tuple[str, str]] = set()


def layer_backend(processor: Any) -> AttentionBackendName | None:
    """The diffusers backend the layer's own processor attends through, or None where that is torch's SDPA
    reached directly: the native backend, or a processor that takes no backend (U-Nets, SD3).

    Example:
        >>> from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
        >>> processor = FluxAttnProcessor()
        >>> layer_backend(processor) is None  # native, as nothing else was chosen
        True
        >>> processor._attention_backend = "flex"  # what set_attention_backend("flex") does
        >>> layer_backend(processor)
        <AttentionBackendName.FLEX: 'flex'>
    """
    inner = innermost(processor)
    if not hasattr(inner, "_attention_backend"):
        return None
    backend = inner._attention_backend or _AttentionBackendRegistry._active_backend
    # A str enum: "native" equals the member, and the member is not rebuilt where it already is one (dynamo).
    if backend == _NATIVE:
        return None
    return backend if isinstance(backend, AttentionBackendName) else AttentionBackendName(backend)


def cannot_run(
    backend: AttentionBackendName,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool = False,
) -> str | None:
    """Why ``backend`` cannot compute this call (``[batch, tokens, heads, head_dim]``), or None if it can.

    The predicates, in order: a dense mask it does not take, dropout it does not have, then diffusers' own
    constraints for the backend (dtype, device, head size, shapes).

    Example:
        >>> q = torch.zeros(1, 4, 2, 8)
        >>> cannot_run(AttentionBackendName.FLEX, q, q, q, None, 0.0) is None
        True
        >>> cannot_run(AttentionBackendName._NATIVE_FLASH, q, q, q, torch.zeros(1, 1, 4, 4), 0.0)
        '_native_flash takes no dense attention mask'
    """
    if attn_mask is not None and backend not in _DENSE_MASKS:
        return f"{backend.value} takes no dense attention mask"
    if dropout_p and "dropout_p" not in _AttentionBackendRegistry._supported_arg_names[backend]:
        return f"{backend.value} has no dropout"
    for check in _AttentionBackendRegistry._constraints[backend]:
        try:
            check(query=query, key=key, value=value, attn_mask=attn_mask, is_causal=is_causal)
        except ValueError as error:
            return f"{backend.value}: {error}"
    return None


def _dense_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """SDPA's mask as a 4-D additive one: diffusers' backends read 2-D masks as key padding, and a boolean mask
    differently (xformers adds it as 0/1, flex builds a block mask its comment calls untested)."""
    mask = mask[(None,) * (4 - mask.ndim)]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask


class BackendRoute(TorchFunctionMode):
    """Compute every SDPA call made while active with diffusers' ``backend`` where it can run the call.

    A call it cannot run (:func:`cannot_run`), or not shaped ``[batch, heads, tokens, head_dim]``, goes to
    torch's SDPA, logged once per backend and reason (logger ``attnsurgery.processors.attention_backend``).

    Args:
        backend: the diffusers backend to compute with.
        layer: a processor that attends through ``dispatch_attention_fn``: it takes the native backend from entry
            until its first SDPA call (it has read its backend by then; later calls of the same processor call go
            to its own backend directly, as our interceptions pass them through), or until exit.

    Example:
        >>> q = torch.randn(1, 2, 4, 8)
        >>> with BackendRoute(AttentionBackendName.FLEX):
        ...     out = F.scaled_dot_product_attention(q, q, q)  # computed by flex_attention
        >>> torch.allclose(out, F.scaled_dot_product_attention(q, q, q), atol=1e-6)
        True
    """

    def __init__(self, backend: AttentionBackendName, layer: Any = None) -> None:
        super().__init__()
        self.backend = backend
        self.layer = layer
        self.forced = False

    def __enter__(self):
        if self.layer is not None:
            self.had_own = "_attention_backend" in self.layer.__dict__
            self.own = self.layer.__dict__.get("_attention_backend")
            self.layer._attention_backend = _NATIVE
            self.forced = True
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._give_back()

    def _give_back(self) -> None:
        """Put the layer's own backend back. Done before the first kernel runs: under torch.compile (2.13),
        attribute writes made after a flex_attention call in the same graph are lost."""
        if not self.forced:
            return
        self.forced = False
        if self.had_own:
            self.layer._attention_backend = self.own
        else:
            del self.layer._attention_backend

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return pass_through(func, args, kwargs)
        self._give_back()
        call = sdpa_arguments(*args, **kwargs)
        q, k, v, mask = call.pop("query"), call.pop("key"), call.pop("value"), call.pop("attn_mask")
        if q.ndim != 4:
            return self._fallback(func, args, kwargs, f"a {q.ndim}-D call, not [batch, heads, tokens, head_dim]")
        query, key, value = (x.transpose(1, 2) for x in (q, k, v))
        mask = None if mask is None else _dense_additive(mask, q.dtype)
        reason = cannot_run(self.backend, query, key, value, mask, call["dropout_p"], call["is_causal"])
        if reason is not None:
            return self._fallback(func, args, kwargs, reason)
        return dispatch_attention_fn(query, key, value, attn_mask=mask, **call, backend=self.backend).transpose(1, 2)

    def _fallback(self, func, args: tuple, kwargs: dict[str, Any], reason: str) -> torch.Tensor:
        if (self.backend.value, reason) not in _logged:
            _logged.add((self.backend.value, reason))
            logger.info("backend %s cannot run an attention call (%s): torch SDPA runs it", self.backend.value, reason)
        return func(*args, **kwargs)


def layer_backend_route(processor: Any) -> AbstractContextManager:
    """What to enter around one call of ``processor`` (a layer's processor, or our wrapper of it) so its attention
    reaches our interception and is computed with the backend the user chose: a :class:`BackendRoute` where the
    layer attends through a diffusers backend other than native, else nothing.

    Enter it outside the interception modes, so their calls reach the route; inner wrappers of the same layer then
    see the native backend and add nothing. The override is on the processor object for part of the call
    (diffusers' own ``attention_backend`` switches a process-wide setting the same way).

    Example:
        >>> from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
        >>> processor = FluxAttnProcessor()
        >>> processor._attention_backend = "flex"
        >>> with layer_backend_route(processor):
        ...     print(processor._attention_backend.value)
        native
        >>> processor._attention_backend
        'flex'
    """
    backend = layer_backend(processor)
    return nullcontext() if backend is None else BackendRoute(backend, innermost(processor))
