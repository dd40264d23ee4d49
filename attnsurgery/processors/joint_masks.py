"""Attention masks of joint DiT calls, turned into something a token-restructuring attention can carry.

Local attention and token merging regroup the keys of a joint call, so a mask over the original
``[tokens, tokens]`` layout no longer lines up. Chroma's float padding mask is the one mask met in the
supported pipelines; it is folded into the queries and keys here, so the restructured call needs no mask at
all. A boolean mask that only hides text keys becomes a per-key keep vector.
"""

from __future__ import annotations

import torch

__all__ = ["fold_product_bias", "text_key_mask"]


def fold_product_bias(
    mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, path: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold an additive 0/1 bias ``m_i * m_j`` (Chroma's float padding mask) into the queries and keys.

    Per query row the bias is ``m_i * (m_j - 1)`` plus a constant, which softmax ignores, so one extra
    channel ``m_i`` on the queries and ``(m_j - 1) / scale`` on the keys adds exactly that to every logit.
    Zero channels pad the head dim to a multiple of 8 for the kernels (on the values too, so every consumer
    sees one head dim; the caller drops them from the output). A key that is kept (``m_j = 1``) carries 0 in
    the extra channel, so averaging kept keys (token merging) keeps the fold exact.

    Args:
        mask: the call's float mask ``[batch, 1, tokens, tokens]``.
        q, k, v: ``[batch, heads, tokens, head_dim]``.
        scale: the call's softmax scale.
        path: the layer, for the error message.

    Raises:
        NotImplementedError: a mask that is not such an outer product.
    """
    m = mask[:, 0].diagonal(dim1=-2, dim2=-1) if mask.dim() == 4 and mask.shape[1] == 1 else None
    refused = (
        f"layer {path!r} got an attention mask of shape {tuple(mask.shape)} ({mask.dtype}); token-restructuring "
        "attention takes boolean masks that hide text keys, or a 0/1 bias that is an outer product of one "
        "padding vector (Chroma's). Drop the mask or leave this layer out."
    )
    if m is None or mask.shape[-2] != q.shape[2]:
        raise NotImplementedError(refused)
    outer = m[:, :, None] * m[:, None, :]
    if torch.compiler.is_compiling():  # a graph cannot branch on the values: it checks them as it runs
        torch._assert_async((mask[:, 0] == outer).all(), refused)
    elif not torch.equal(mask[:, 0], outer):
        raise NotImplementedError(refused)
    extra = 8 - q.shape[-1] % 8
    q_extra = torch.zeros(*q.shape[:-1], extra, dtype=q.dtype, device=q.device)
    k_extra = torch.zeros_like(q_extra)
    q_extra[..., 0] = m[:, None, :].to(q.dtype)
    k_extra[..., 0] = ((m - 1) / scale)[:, None, :].to(k.dtype)
    v_extra = torch.zeros(*v.shape[:-1], extra, dtype=v.dtype, device=v.device)
    return torch.cat([q, q_extra], dim=-1), torch.cat([k, k_extra], dim=-1), torch.cat([v, v_extra], dim=-1)


def text_key_mask(mask: torch.Tensor, num_text: int, num_image: int, text_first: bool, path: str) -> torch.Tensor:
    """The ``[batch, num_text]`` keep vector of a boolean ``[batch, 1, queries, keys]`` mask that only hides text
    keys (padding) from the image queries; any other boolean mask is refused."""
    image_keys = slice(num_text, num_text + num_image) if text_first else slice(0, num_image)
    text_keys = slice(0, num_text) if text_first else slice(num_image, num_image + num_text)
    if mask.dim() == 4 and mask.shape[1] == 1:
        keep = mask[:, 0].any(dim=-2)  # a key some query may see
        image_rows = mask[:, 0, image_keys if mask.shape[2] > 1 else slice(None)]
        if keep[:, image_keys].all() and torch.equal(image_rows, keep[:, None].expand_as(image_rows)):
            return keep[:, text_keys]
    raise NotImplementedError(
        f"layer {path!r} got an attention mask of shape {tuple(mask.shape)} ({mask.dtype}); token-restructuring "
        "attention takes only boolean masks that hide text keys. Drop the mask or leave this layer out."
    )
