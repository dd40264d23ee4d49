"""Agent attention (AgentSD) as pure tensor functions.

"Agent Attention: On the Integration of Softmax and Linear Attention" (Han et al., ECCV 2024): a few
*agent* tokens first gather from all keys/values, then every query reads from the agents. Both steps are
ordinary softmax attentions, so two ``F.scaled_dot_product_attention`` calls do it in ``O(N n)`` with no
``N x N`` map. Per head, with ``s = d**-0.5``::

    V_A = softmax(A K^T s) V
    O   = softmax(Q A^T s**k_scale2) V_A + k_shortcut V

Shapes: ``q, k, v: [B, H, N, d]`` (self-attention, so ``q`` and ``v`` have the same tokens),
``agents: [B, H, n, d]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

K_SCALE2 = 0.3
"""AgentSD's temperature exponent for the query-to-agent softmax (scale ``d**-0.15``)."""

K_SHORTCUT = 0.075
"""AgentSD's value shortcut weight (no depthwise conv, which would need training)."""


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    *,
    k_scale2: float = K_SCALE2,
    k_shortcut: float = K_SHORTCUT,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Attend queries to keys/values through agent tokens.

    Args:
        q: ``[B, H, N, d]`` queries.
        k: ``[B, H, N, d]`` keys.
        v: ``[B, H, N, d]`` values.
        agents: ``[B, H, n, d]`` agent tokens, already projected with the layer's query projection.
        k_scale2: exponent of the second softmax's scale ``d**-0.5``.
        k_shortcut: weight of the value shortcut.
        compute_dtype: dtype for both attentions (e.g. ``torch.float32`` for SD2.1 in fp16); None keeps
            the input dtype.

    Returns:
        ``[B, H, N, d]`` in the dtype of ``q``.

    Example:
        >>> q = k = v = torch.randn(1, 2, 64, 8)
        >>> agent_attention(q, k, v, q[:, :, ::16]).shape
        torch.Size([1, 2, 64, 8])
    """
    if q.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"agent attention needs self-attention (queries and values with the same tokens); got "
            f"{q.shape[-2]} queries and {v.shape[-2]} values"
        )
    out_dtype = q.dtype
    if compute_dtype is not None:
        q, k, v, agents = (t.to(compute_dtype) for t in (q, k, v, agents))
    scale = 1.0 / math.sqrt(q.shape[-1])
    agent_values = F.scaled_dot_product_attention(agents, k, v, scale=scale)
    out = F.scaled_dot_product_attention(q, agents, agent_values, scale=scale**k_scale2)
    return (out + k_shortcut * v).to(out_dtype)


def merge_counts(num_tokens: int, num_src: int, ratio: float, agent_ratio: float) -> tuple[int, int]:
    """ToMe's merge count ``r`` and the agent merge count ``agent_r``, both capped at the src count.

    Args:
        num_tokens: ``N``.
        num_src: src tokens of the partition (``N`` minus one dst per cell).
        ratio: fraction of ``N`` removed from queries/keys/values.
        agent_ratio: fraction of ``N`` removed to form the agents.

    Returns:
        ``(r, agent_r)``.

    Example:
        >>> merge_counts(4096, 3840, 0.4, 0.95)
        (1638, 3840)
    """
    return min(num_src, int(num_tokens * ratio)), min(num_src, int(num_tokens * agent_ratio))


def agents_pay_off(num_tokens: int, r: int, agent_r: int) -> bool:
    """AgentSD's rule: agents only when ``2 (N - agent_r) < N - r``, else plain ToMe attention.

    Example:
        >>> agents_pay_off(4096, 1638, 3840), agents_pay_off(4096, 1638, 2048)
        (True, False)
    """
    return 2 * (num_tokens - agent_r) < num_tokens - r


def pool_agents(q: torch.Tensor, h: int, w: int, sx: int, sy: int) -> torch.Tensor:
    """Sort-free agents: average-pool the queries over ``sy x sx`` cells of the grid.

    Ragged border cells average only the tokens they hold.

    Args:
        q: ``[B, H, N, d]`` queries in row-major grid order, ``N == h * w``.
        h: grid height.
        w: grid width.
        sx: cell width.
        sy: cell height.

    Returns:
        ``[B, H, ceil(h / sy) * ceil(w / sx), d]``.

    Example:
        >>> pool_agents(torch.randn(1, 2, 64, 8), 8, 8, 4, 4).shape
        torch.Size([1, 2, 4, 8])
    """
    batch, heads, num_tokens, dim = q.shape
    if h * w != num_tokens:
        raise ValueError(f"grid {h}x{w} has {h * w} tokens but the queries have {num_tokens}")
    grid = q.transpose(-1, -2).reshape(batch * heads, dim, h, w)
    pooled = F.avg_pool2d(grid, (sy, sx), ceil_mode=True)
    # Contiguous head_dim: SDPA's fused CPU/GPU kernels need it, else a math fallback builds the N x n map.
    return pooled.reshape(batch, heads, dim, -1).transpose(-1, -2).contiguous()
