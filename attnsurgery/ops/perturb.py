"""Head-level attention perturbations for perturbation guidance (PAG, SoftPAG and relatives).

Every perturbation replaces a head's attention map A by (1 - u) A + u P for a per-(row, head) weight u and a
perturbed map P. Since o = A V is linear in the map, the result is lerp(o, P V, u): it needs only the
SDPA inputs and output, never an N x N map (derivation: docs/techniques/perturbation-guidance.md).

- identity (PAG, SoftPAG for u < 1): P = I, so P V = V.
- uniform: P = 1/M, so P V = mean of V over the keys, broadcast to every query.
- mean_query (SEG with infinite blur): every query replaced by the mean query; a one-query SDPA.
- temperature: P = softmax(Q K^T scale / tau); an SDPA with a smaller scale.
- identity with ``image_tokens`` (diffusers' SD3 PAG variant): image queries keep the text keys and see
  only themselves among the image keys; text queries are unchanged. Computed by one SDPA over the text
  keys plus one extra key that carries each query's own logit (see `_image_only_identity`).

Shapes: q [batch, heads, queries, dim]; k, v [batch, heads, keys, dim]; out [batch, heads, queries, dim].
The perturbed (row, head) pairs come as three 1-D tensors of equal length P: rows, heads and weights, so
that every batch row can carry its own head weights (many head sets evaluated in one batch).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

PerturbationKind = Literal["identity", "uniform", "mean_query", "temperature"]
KINDS: tuple[str, ...] = ("identity", "uniform", "mean_query", "temperature")

# Extra channels used by the image-only identity: one for the self logit / self weight, padded so that the
# head dim stays a multiple of 8 (the fused SDPA kernels want that).
_EXTRA_CHANNELS = 8


def head_pairs(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-zero entries of a [rows, heads] weight table as (rows, heads, weights), each [P].

    Build the table on the CPU (it is small) so that no device synchronisation is needed; move the result
    to the attention's device afterwards.

    Example:
        >>> rows, heads, w = head_pairs(torch.tensor([[0.0, 1.0], [0.5, 0.0]]))
        >>> rows.tolist(), heads.tolist(), w.tolist()
        ([0, 1], [1, 0], [1.0, 0.5])
    """
    if weights.ndim != 2:
        raise ValueError(f"head weights must be [rows, heads], got shape {tuple(weights.shape)}")
    rows, heads = weights.nonzero(as_tuple=True)
    return rows, heads, weights[rows, heads]


def perturb_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    rows: torch.Tensor,
    heads: torch.Tensor,
    weights: torch.Tensor,
    kind: PerturbationKind = "identity",
    *,
    scale: float | None = None,
    temperature: float | None = None,
    image_tokens: slice | None = None,
    attn_mask: torch.Tensor | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Blend the attention output of the selected (row, head) pairs toward their perturbed output.

    Pairs not listed are returned bit-identical; the input `out` is not modified unless `inplace`.

    Args:
        q: queries [batch, heads, queries, dim].
        k: keys [batch, heads, keys, dim].
        v: values [batch, heads, keys, dim].
        out: the unperturbed SDPA output [batch, heads, queries, dim].
        rows: batch index of each perturbed pair [P] (long).
        heads: head index of each perturbed pair [P] (long).
        weights: blend weight u of each pair [P]; 1 is the full perturbation, 0 none.
        kind: "identity", "uniform", "mean_query" or "temperature".
        scale: the SDPA scale of the original call (None: 1 / sqrt(dim)).
        temperature: tau > 0 for kind="temperature" (tau > 1 flattens the map).
        image_tokens: for kind="identity" on a joint image+text sequence, the image query/key range; the
            identity is then put on the image-image block only (diffusers' SD3 PAG variant).
        attn_mask: the original SDPA call's mask (boolean, or added to the logits), broadcastable to
            [batch, heads, queries, keys]: the image-only identity keeps the text keys it masks out (Chroma's
            T5 padding, Z-Image's batch padding) masked. The other kinds do not take a mask.
        inplace: write into `out` (saves a copy of it; only where autograd does not need `out`).

    Example:
        >>> q = k = v = torch.randn(2, 4, 16, 8)
        >>> out = F.scaled_dot_product_attention(q, k, v)
        >>> new = perturb_heads(q, k, v, out, torch.tensor([1]), torch.tensor([3]), torch.tensor([1.0]))
        >>> torch.equal(new[1, 3], v[1, 3]) and torch.equal(new[0], out[0])
        True
    """
    _check_tensors(q, k, v, out, (rows, heads, weights))
    _check_kind(kind, temperature, image_tokens, q.shape[-2], k.shape[-2])
    if rows.numel() == 0:
        return out
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    index = (rows, heads)
    op = out[index]  # [P, queries, dim]
    u = weights.to(out.dtype).view(-1, 1, 1)
    if image_tokens is not None:
        mask = None if attn_mask is None else attn_mask.expand(*q.shape[:-1], k.shape[-2])[index]
        target = _image_only_identity(q[index], k[index], v[index], image_tokens, scale, mask)
        blended = op.clone()
        blended[:, image_tokens] = torch.lerp(op[:, image_tokens], target, u)
    else:
        blended = torch.lerp(op, _perturbed_output(q, k, v, index, kind, scale, temperature).expand_as(op), u)
    return out.index_put_(index, blended) if inplace else out.index_put(index, blended)


def _perturbed_output(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: tuple[torch.Tensor, torch.Tensor],
    kind: str,
    scale: float,
    temperature: float | None,
) -> torch.Tensor:
    """P V for the pairs in `index`, [P, queries or 1, dim]; gathers only the inputs the kind reads."""
    if kind == "identity":
        return v[index]
    if kind == "uniform":
        return v[index].mean(dim=-2, keepdim=True)
    if kind == "mean_query":
        return F.scaled_dot_product_attention(q[index].mean(dim=-2, keepdim=True), k[index], v[index], scale=scale)
    return F.scaled_dot_product_attention(q[index], k[index], v[index], scale=scale / temperature)


def _image_only_identity(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, image: slice, scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Image queries attending to the text keys and to their own image key only; [P, image tokens, dim].

    Each image query i needs softmax over {text keys} + {k_i}. The extra key k_i differs per query, so we
    append one shared extra key whose logit is carried by the query instead: q'_i = [q_i, q_i . k_i],
    k_extra = [0, 1] (same scale). Its value is the unit vector of an extra channel, so that channel
    returns the self weight alpha_i, and the first `dim` channels return (1 - alpha_i) o_text_i. Then
    o_i = o'_i[:dim] + alpha_i v_i. SDPA's own max-subtraction keeps this stable.
    """
    n_pairs, n_tokens, dim = q.shape
    text = torch.cat([torch.arange(0, image.start), torch.arange(image.stop, n_tokens)]).to(q.device)
    q_img, k_img, v_img = q[:, image], k[:, image], v[:, image]
    self_logit = (q_img.float() * k_img.float()).sum(dim=-1, keepdim=True).to(q.dtype)  # [P, Ni, 1]
    pad = q.new_zeros(n_pairs, 1, _EXTRA_CHANNELS)
    pad_q = q.new_zeros(n_pairs, q_img.shape[1], _EXTRA_CHANNELS - 1)
    q_aug = torch.cat([q_img, self_logit, pad_q], dim=-1)
    extra_key = torch.cat([q.new_zeros(n_pairs, 1, dim), pad], dim=-1)
    extra_key[:, :, dim] = 1.0
    text_pad = q.new_zeros(n_pairs, text.numel(), _EXTRA_CHANNELS)
    k_aug = torch.cat([torch.cat([k[:, text], text_pad], dim=-1), extra_key], dim=1)
    v_aug = torch.cat([torch.cat([v[:, text], text_pad], dim=-1), extra_key], dim=1)
    if mask is not None:
        keep = torch.ones_like(mask[:, :1, :1]) if mask.dtype == torch.bool else torch.zeros_like(mask[:, :1, :1])
        mask = torch.cat([mask[:, image][:, :, text], keep.expand(-1, q_img.shape[1], 1)], dim=-1)
    o_aug = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, attn_mask=mask, scale=scale)
    return o_aug[..., :dim] + o_aug[..., dim : dim + 1] * v_img


def _check_tensors(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, pairs: tuple[torch.Tensor, ...]
) -> None:
    """Raise ValueError naming a shape mismatch and the fix."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be [batch, heads, tokens, dim], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if out.shape != q.shape[:-1] + v.shape[-1:]:
        raise ValueError(f"out {tuple(out.shape)} does not match q {tuple(q.shape)} and v {tuple(v.shape)}")
    shapes = [tuple(t.shape) for t in pairs]
    if len(set(shapes)) != 1 or len(shapes[0]) != 1:
        raise ValueError(
            f"rows, heads, weights must be 1-D of equal length, got {shapes}; build them with head_pairs()"
        )


def _check_kind(kind: str, temperature: float | None, image_tokens: slice | None, queries: int, keys: int) -> None:
    """Raise ValueError naming a bad perturbation setting and the fix."""
    if kind not in KINDS:
        raise ValueError(f"unknown perturbation kind {kind!r}; use one of {KINDS}")
    if kind == "identity" and image_tokens is None and queries != keys:
        raise ValueError(
            f"identity attention needs self-attention (as many queries as keys), got {queries} queries "
            f"and {keys} keys; perturb self-attention layers only"
        )
    if kind == "temperature" and (temperature is None or temperature <= 0):
        raise ValueError(f"kind='temperature' needs temperature > 0, got {temperature!r}")
    if image_tokens is not None:
        if kind != "identity":
            raise ValueError(f"image_tokens (joint='image_only') supports kind='identity' only, got {kind!r}")
        if queries != keys or not 0 <= image_tokens.start <= image_tokens.stop <= queries:
            raise ValueError(f"image_tokens {image_tokens} must lie inside a joint self-attention of {queries} tokens")
