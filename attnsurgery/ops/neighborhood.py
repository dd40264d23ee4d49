"""2-D neighbourhood attention over a joint text + image sequence, with backends chosen by predicate.

Image queries attend a window of the image grid (NATTEN's neighbourhood attention, GNA's strided variant,
blocked windows at stride == window; dilation per axis) plus every text key; text queries attend every key.
The key sets are :class:`~attnsurgery.ops.neighborhood_spec.NeighborhoodSpec`'s
(docs/techniques/neighborhood-attention.md).

Backends (``ops/neighborhood_backends/``): ``reference`` (explicit mask, any dtype), ``tiles`` (SDPA over
stride-aligned tiles), ``flex`` (compiled FlexAttention with a cached BlockMask), ``natten`` (the optional
``natten`` package on CUDA). ``auto`` takes the first entry of :data:`AUTO_ORDER` whose preference holds and
whose backend can run the call, and logs its choice once per distinct call; a backend named explicitly that
cannot run raises the reason.

Shapes: ``q, k, v: [batch, heads, tokens, head_dim]``, ``tokens = num_text + rows * cols``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from types import ModuleType

import torch

from attnsurgery.ops.neighborhood_backends import flex, natten, reference, tiles
from attnsurgery.ops.neighborhood_spec import NeighborhoodSpec, Pair, window_start

__all__ = ["AUTO_ORDER", "BACKENDS", "NeighborhoodSpec", "choose_backend", "neighborhood_attention", "window_start"]

logger = logging.getLogger(__name__)

BACKENDS: dict[str, ModuleType] = {"natten": natten, "flex": flex, "tiles": tiles, "reference": reference}

AUTO_ORDER: tuple[tuple[str, str, Callable[[torch.Tensor, NeighborhoodSpec], bool]], ...] = (
    ("natten", "CUDA tensors", lambda q, spec: q.device.type == "cuda"),
    ("flex", "a window smaller than the grid", lambda q, spec: not spec.is_dense),
    ("tiles", "any call", lambda q, spec: True),
    ("reference", "any call", lambda q, spec: True),
)
"""``auto``'s order: (backend, when it is preferred, the preference). NATTEN's fused kernels first where they
run; then compiled FlexAttention, which skips unattended key blocks without gathering copies of K and V, and
measured 1.6-2.7x faster than ``tiles`` on CPU at FLUX.1's 2K shape (docs/techniques/neighborhood-attention.md);
``tiles`` where flex cannot run (float64, no compiler) and for a window covering the grid, which is one dense
SDPA call per token kind and not worth a compilation; ``reference`` last, as it holds the full score matrix."""

_logged: set[tuple] = set()


def choose_backend(q: torch.Tensor, spec: NeighborhoodSpec, text_key_mask: torch.Tensor | None = None) -> str:
    """The backend ``auto`` runs for this call, logged (logger ``attnsurgery.ops.neighborhood``) once per shape.

    Example:
        >>> choose_backend(torch.zeros(1, 2, 20, 8), NeighborhoodSpec((4, 5), window=9))  # covers the grid
        'tiles'
        >>> choose_backend(torch.zeros(1, 2, 20, 8, dtype=torch.float64), NeighborhoodSpec((4, 5), window=3))
        'tiles'
    """
    skipped = []
    for name, preferred_on, prefers in AUTO_ORDER:
        if not prefers(q, spec):
            skipped.append(f"{name} (preferred on {preferred_on} only)")
            continue
        reason = BACKENDS[name].check(q, spec, text_key_mask)
        if reason is None:
            key = (spec, tuple(q.shape), q.dtype, q.device.type, text_key_mask is not None)
            if key not in _logged:
                _logged.add(key)
                logger.info(
                    "neighborhood attention %s on %s %s %s: backend %s%s",
                    spec,
                    tuple(q.shape),
                    q.dtype,
                    q.device.type,
                    name,
                    f" (skipped: {'; '.join(skipped)})" if skipped else "",
                )
            return name
        skipped.append(f"{name} ({reason})")
    raise RuntimeError(f"no neighborhood attention backend can run this call: {'; '.join(skipped)}.")


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: NeighborhoodSpec, text_key_mask: torch.Tensor | None
) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}; pass [batch, heads, tokens, head_dim] (split the heads first)."
            )
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share batch, heads and tokens "
            "(and q, k the head dim): neighbourhood attention is self-attention over one joint sequence."
        )
    if q.shape[2] != spec.num_tokens:
        raise ValueError(
            f"got {q.shape[2]} tokens but num_text {spec.num_text} + grid {spec.grid[0]}x{spec.grid[1]} = "
            f"{spec.num_tokens}; pass this call's image grid and its number of text tokens."
        )
    if text_key_mask is not None and (
        text_key_mask.dtype != torch.bool or tuple(text_key_mask.shape) != (q.shape[0], spec.num_text)
    ):
        raise ValueError(
            f"text_key_mask is {text_key_mask.dtype} {tuple(text_key_mask.shape)}; pass a bool "
            f"[batch, num_text] = [{q.shape[0]}, {spec.num_text}] mask, True for the text keys to keep."
        )


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Pair,
    window: Pair,
    stride: Pair = 1,
    dilation: Pair = 1,
    *,
    num_text: int = 0,
    text_first: bool = True,
    scale: float | None = None,
    backend: str = "auto",
    text_key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attend each image query to its grid neighbourhood plus every text key, each text query to every key.

    Per axis (rows, cols) of length ``L``: dilation ``d`` splits the axis into sub-axes of the positions with
    equal ``i mod d``; on a sub-axis of length ``M`` query ``i`` (group ``g = i // stride``) sees positions
    ``[start, start + window)``, ``start = clamp(g*stride + floor((stride - window) / 2), 0, M - window)``.
    A window larger than the grid side is clamped to the side (a window covering the grid is dense
    attention). Stride 1 is neighbourhood attention, stride == window blocked attention.

    Args:
        q: ``[batch, heads, tokens, head_dim]`` queries, ``tokens = num_text + grid[0] * grid[1]``, image
            tokens row-major.
        k: keys, the shape of ``q``.
        v: values, ``[batch, heads, tokens, value_dim]``.
        grid: image tokens (rows, cols), or one int for a square grid.
        window: keys per axis; an int or (rows, cols).
        stride: query group size per axis, ``1 <= stride <= window``.
        dilation: spacing of the window's keys per axis, ``dilation * window <= grid side``.
        num_text: non-image tokens (text, and anything that attends and is attended globally).
        text_first: the text tokens come before the image tokens (else after).
        scale: softmax scale; None is ``1 / sqrt(head_dim)``, as in SDPA.
        backend: ``"auto"``, ``"tiles"``, ``"flex"``, ``"natten"`` or ``"reference"``.
        text_key_mask: ``[batch, num_text]`` bool, True for text keys to keep; False hides a (padding) text
            key from every query, image and text alike. None keeps all.

    Returns:
        ``[batch, heads, tokens, value_dim]`` in ``q``'s dtype and token order.

    Raises:
        ValueError: bad shapes, window, stride, dilation or mask; a named backend that cannot take the input.
        RuntimeError: a named backend missing from this environment (natten not installed, not on CUDA).

    Example:
        >>> q = k = v = torch.randn(1, 2, 4 + 6 * 8, 16)
        >>> out = neighborhood_attention(q, k, v, grid=(6, 8), window=3, num_text=4, backend="tiles")
        >>> out.shape
        torch.Size([1, 2, 52, 16])
    """
    spec = NeighborhoodSpec(grid, window, stride, dilation, num_text=num_text, text_first=text_first)
    _check_inputs(q, k, v, spec, text_key_mask)
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of 'auto', {', '.join(map(repr, BACKENDS))}.")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if torch.compiler.is_compiling():
        # Opaque to the compiler: the backends choose in Python and build their plans with data-dependent steps.
        args = (spec.grid, spec.window, spec.stride, spec.dilation, spec.num_text, spec.text_first, scale, backend)
        return _opaque_attend(q, k, v, text_key_mask, *args)
    return _attend(q, k, v, spec, scale, backend, text_key_mask)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: NeighborhoodSpec,
    scale: float,
    backend: str,
    text_key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """The call on checked inputs, by ``backend`` (``auto`` chooses one; a named one that cannot run raises)."""
    if backend == "auto":
        backend = choose_backend(q, spec, text_key_mask)
    else:
        reason = BACKENDS[backend].check(q, spec, text_key_mask)
        if reason is not None:
            raise reason
    return BACKENDS[backend].run(q, k, v, spec, scale, text_key_mask)


@torch.library.custom_op("attnsurgery::neighborhood_attention", mutates_args=())
def _opaque_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_key_mask: torch.Tensor | None,
    grid: Sequence[int],
    window: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    num_text: int,
    text_first: bool,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """:func:`_attend` as one op of a compiled graph: it runs eagerly there (flex compiles its own kernel), with
    no autograd formula, so eager calls take :func:`_attend` directly."""
    spec = NeighborhoodSpec(tuple(grid), tuple(window), tuple(stride), tuple(dilation), num_text, text_first)
    return _attend(q, k, v, spec, scale, backend, text_key_mask)


@_opaque_attend.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: object) -> torch.Tensor:
    return q.new_empty(*q.shape[:3], v.shape[-1])
