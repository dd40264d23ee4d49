"""The plainly correct backend: the whole ``[N, N]`` boolean mask and explicit masked softmax attention.

Any dtype (float64 in the tests); half-precision inputs are computed in float32 and cast back. It holds the
full score matrix, ``batch * heads * N * N`` values, so it is for checking and small grids only.
"""

from __future__ import annotations

import torch

from attnsurgery.ops.neighborhood_backends.common import key_keep
from attnsurgery.ops.neighborhood_spec import NeighborhoodSpec


def check(q: torch.Tensor, spec: NeighborhoodSpec, text_key_mask: torch.Tensor | None) -> Exception | None:
    """The reference runs every call."""
    return None


def run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: NeighborhoodSpec,
    scale: float,
    text_key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """``softmax(q k^T * scale, masked) v`` with the spec's mask; shapes ``[B, H, N, D]``."""
    allowed = spec.token_mask().to(q.device)
    keep = key_keep(text_key_mask, spec)
    if keep is not None:
        allowed = allowed & keep[:, None, None, :]
    work = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(work) @ k.to(work).transpose(-1, -2)) * scale
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return (weights @ v.to(work)).to(q.dtype)
