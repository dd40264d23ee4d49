"""NATTEN's fused neighbourhood kernels (``natten.na2d``), for users who have the package and a CUDA device.

Image queries go through ``na2d`` with the text keys as its ``additional_keys``; text queries take one
dense SDPA call. NATTEN takes heads-last tensors (``[batch, rows, cols, heads, head_dim]``). Written from
NATTEN's documented ``na2d`` signature; this project's CI has neither the package nor a GPU, so the GPU
tests are the check that NATTEN's borders and strides follow our spec.
"""

from __future__ import annotations

import importlib.util

import torch

from attnsurgery.ops.neighborhood_backends.common import attend_text_queries, join_tokens
from attnsurgery.ops.neighborhood_spec import NeighborhoodSpec


def check(q: torch.Tensor, spec: NeighborhoodSpec, text_key_mask: torch.Tensor | None) -> Exception | None:
    """NATTEN needs the package, CUDA tensors, and no hidden text keys (its additional keys have no mask)."""
    if importlib.util.find_spec("natten") is None:
        return RuntimeError("the natten package is not installed; `pip install natten` or use backend='flex'.")
    if q.device.type != "cuda":
        return RuntimeError(f"NATTEN runs on CUDA tensors, these are on {q.device}; use backend='tiles' or 'flex'.")
    if text_key_mask is not None:
        return ValueError("NATTEN cannot hide padded text keys; pass text_key_mask=None or use backend='flex'.")
    return None


def run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: NeighborhoodSpec,
    scale: float,
    text_key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Neighbourhood attention with ``natten.na2d``; shapes ``[B, H, N, D]``."""
    import natten

    batch, heads, _, dim = q.shape
    image, text = spec.image_slice(), spec.text_slice()

    def heads_last(x: torch.Tensor) -> torch.Tensor:
        return x[:, :, image].transpose(1, 2).reshape(batch, *spec.grid, heads, dim)

    extra = {}
    if spec.num_text:
        extra = {"additional_keys": k[:, :, text].transpose(1, 2), "additional_values": v[:, :, text].transpose(1, 2)}
    out = natten.na2d(
        heads_last(q),
        heads_last(k),
        heads_last(v),
        kernel_size=spec.window,
        stride=spec.stride,
        dilation=spec.dilation,
        scale=scale,
        **extra,
    )
    out = out.reshape(batch, spec.num_image, heads, dim).transpose(1, 2)
    return join_tokens(attend_text_queries(q, k, v, spec, scale, None), out, spec)
