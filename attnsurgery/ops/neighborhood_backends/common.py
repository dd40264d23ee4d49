"""Pieces every backend shares: the text/image split of the sequence and the text queries' dense attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnsurgery.ops.neighborhood_spec import NeighborhoodSpec


def key_keep(text_key_mask: torch.Tensor | None, spec: NeighborhoodSpec) -> torch.Tensor | None:
    """``[batch, N]`` bool in sequence order (image keys always kept), or None when nothing is hidden."""
    if text_key_mask is None:
        return None
    image = torch.ones(text_key_mask.shape[0], spec.num_image, dtype=torch.bool, device=text_key_mask.device)
    parts = (text_key_mask, image) if spec.text_first else (image, text_key_mask)
    return torch.cat(parts, dim=1)


def join_tokens(text: torch.Tensor, image: torch.Tensor, spec: NeighborhoodSpec) -> torch.Tensor:
    """``[B, H, T, D]`` and ``[B, H, P, D]`` -> ``[B, H, N, D]`` in the sequence's order."""
    return torch.cat((text, image) if spec.text_first else (image, text), dim=2)


def attend_text_queries(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: NeighborhoodSpec,
    scale: float,
    keep: torch.Tensor | None,
) -> torch.Tensor:
    """Text queries see every key: one dense SDPA call, ``[B, H, N, D]`` in, ``[B, H, T, D]`` out."""
    if spec.num_text == 0:
        return q[:, :, :0]
    mask = None if keep is None else keep[:, None, None, :]
    return F.scaled_dot_product_attention(q[:, :, spec.text_slice()], k, v, attn_mask=mask, scale=scale)
