"""diffusers' attention backends this machine runs, and a recorder of the calls that reach one."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _AttentionBackendRegistry,
    _check_attention_backend_requirements,
    dispatch_attention_fn,
)


@functools.cache
def runnable_backends() -> tuple[str, ...]:
    """The registered backends whose requirements are met and that run a float32 call on the CPU (native,
    _native_math, _native_flash and flex with torch 2.13; hub kernels are never downloaded offline)."""
    q = torch.zeros(1, 4, 2, 8)
    found = []
    for backend in _AttentionBackendRegistry.list_backends():
        try:
            _check_attention_backend_requirements(backend)
            dispatch_attention_fn(q, q, q, backend=backend)
        except Exception:  # any failure means: not runnable here
            continue
        found.append(backend.value)
    return tuple(found)


@contextmanager
def backend_calls(backend: str) -> Iterator[list[tuple[int, ...]]]:
    """Record (batch, heads, queries, keys) of every call that reaches ``backend``'s diffusers function."""
    name = AttentionBackendName(backend)
    original, seen = _AttentionBackendRegistry._backends[name], []

    @functools.wraps(original)
    def recording(query, key, value, **kwargs):
        seen.append((query.shape[0], query.shape[2], query.shape[1], key.shape[1]))
        return original(query, key, value, **kwargs)

    _AttentionBackendRegistry._backends[name] = recording
    try:
        yield seen
    finally:
        _AttentionBackendRegistry._backends[name] = original
