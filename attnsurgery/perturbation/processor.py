"""The head-perturbation processor: wraps a layer's own processor and edits its attention output.

The processor is stateless about time and batch; the guidance wrapper tells it, per denoiser call, which
batch rows and heads to perturb through a shared `PerturbationState` (one per plugin application).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models import attention_processor as diffusers_processors

from ..ops.perturb import head_pairs, perturb_heads
from ..processors.attention_backend import layer_backend_route
from ..processors.base import WrappingProcessor, innermost
from ..processors.sdpa_intercept import FirstAttentionCall

# diffusers processors that compute attention without torch's SDPA (so the perturbation has no call to edit):
# what put them there, and how to undo that before apply.
_SLICING = ("attention slicing", "call pipe.disable_attention_slicing()")
_XFORMERS = ("xformers", "call pipe.disable_xformers_memory_efficient_attention()")
_CLASSIC = (
    "the pre-SDPA processor that set_default_attn_processor() installs on U-Nets",
    "call denoiser.set_attn_processor(AttnProcessor2_0()) (from diffusers.models.attention_processor)",
)
_WITHOUT_SDPA: dict[type, tuple[str, str]] = {
    diffusers_processors.SlicedAttnProcessor: _SLICING,
    diffusers_processors.SlicedAttnAddedKVProcessor: _SLICING,
    diffusers_processors.XFormersAttnProcessor: _XFORMERS,
    diffusers_processors.XFormersAttnAddedKVProcessor: _XFORMERS,
    diffusers_processors.XFormersJointAttnProcessor: _XFORMERS,
    diffusers_processors.IPAdapterXFormersAttnProcessor: _XFORMERS,
    diffusers_processors.AttnProcessor: _CLASSIC,
    diffusers_processors.AttnAddedKVProcessor: _CLASSIC,
}


def _without_sdpa(processor: Any, path: str) -> str | None:
    """Why the processor under ``processor`` cannot be perturbed and how to fix it, for the diffusers
    processors known to compute attention without SDPA; None for any other."""
    inner = type(innermost(processor))
    if inner not in _WITHOUT_SDPA:
        return None
    cause, fix = _WITHOUT_SDPA[inner]
    return (
        f"perturbed attention cannot act on layer {path!r}: its processor {inner.__name__} ({cause}) computes "
        f"attention without torch's scaled_dot_product_attention, the call the perturbation edits. "
        f"{fix[0].upper()}{fix[1:]} before attnsurgery.apply."
    )


def check_reaches_sdpa(processor: Any, path: str) -> None:
    """Refuse, at apply, a layer whose processor is a diffusers one known to compute attention without SDPA.

    Raises:
        NotImplementedError: naming the processor, what installed it and the call that undoes it.
    """
    reason = _without_sdpa(processor, path)
    if reason is not None:
        raise NotImplementedError(reason)


@dataclass
class LayerPlan:
    """The (row, head, weight) pairs one layer perturbs during the current denoiser call."""

    rows: torch.Tensor
    heads: torch.Tensor
    weights: torch.Tensor
    # The last copy, as (device, pairs): an attribute, not a dict by device, since under torch.compile a dict
    # mutated in the graph breaks it at the next layer's inspect.signature (a mapping proxy) in diffusers.
    _on_device: tuple[torch.device, tuple[torch.Tensor, ...]] | None = None

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pairs on `device`, copied once per call (the plan is built on the CPU: no sync)."""
        if self._on_device is None or self._on_device[0] != device:
            self._on_device = (device, tuple(t.to(device) for t in (self.rows, self.heads, self.weights)))
        return self._on_device[1]


@dataclass
class PerturbationState:
    """What the perturbation processors do during the current denoiser call.

    Args:
        kind: the perturbation ("identity", "uniform", "mean_query", "temperature").
        temperature: tau for kind="temperature".
        image_only: put the identity on the image-image block of a joint sequence only.
    """

    kind: str = "identity"
    temperature: float | None = None
    image_only: bool = False
    plans: dict[str, LayerPlan] = field(default_factory=dict)
    num_image_tokens: int | None = None

    def activate(self, rows: range, weights: Mapping[str, torch.Tensor], num_image_tokens: int | None) -> None:
        """Perturb the batch rows `rows` with per-row head weights.

        Args:
            rows: the perturbed batch rows (consecutive).
            weights: layer path -> [len(rows), heads] weights on the CPU, row r of a table for batch row
                rows[r], so every row can carry its own head set; a [1, heads] table applies to every row.
            num_image_tokens: image tokens of a joint sequence (for image_only), else None.
        """
        self.plans = {}
        for path, table in weights.items():
            if table.shape[0] not in (1, len(rows)):
                raise ValueError(
                    f"head weights for {path!r} have {table.shape[0]} rows for {len(rows)} perturbed batch rows; "
                    "give one row per perturbed row, or a single row for all of them"
                )
            table_rows, heads, w = head_pairs(table.expand(len(rows), -1))
            if table_rows.numel():
                self.plans[path] = LayerPlan(table_rows + rows.start, heads, w)
        self.num_image_tokens = num_image_tokens

    def deactivate(self) -> None:
        """Back to the plain model: every processor calls its inner processor untouched."""
        self.plans = {}
        self.num_image_tokens = None

    def image_tokens(self, num_tokens: int, text_first: bool) -> slice | None:
        """The image range in a sequence of `num_tokens` tokens whose other tokens come first or last (the
        layer's declared text placement), when image_only applies."""
        if not self.image_only or self.num_image_tokens is None:
            return None
        n_image = min(self.num_image_tokens, num_tokens)
        return slice(num_tokens - n_image, num_tokens) if text_first else slice(0, n_image)


class HeadPerturbationProcessor(WrappingProcessor):
    """Runs the layer's own processor and blends the selected heads of the perturbed rows.

    Inactive (no plan for this layer), it is a plain pass-through, so outputs are bit-identical.

    Args:
        inner: the layer's own processor.
        path: the layer's path (its key in the state's plans).
        state: the state shared with the guidance wrapper.
        text_first: the layer's non-image tokens come before its image tokens (``text_placement == "first"``).
    """

    def __init__(self, inner: Any, path: str, state: PerturbationState, text_first: bool = False) -> None:
        super().__init__(inner)
        self.path = path
        self.state = state
        self.text_first = text_first

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        plan = self.state.plans.get(self.path)
        if plan is None:
            return self.inner(attn, hidden_states, *args, **kwargs)
        edit = FirstAttentionCall(lambda q, k, v, out, call: self._edit(plan, q, k, v, out, call))
        with layer_backend_route(self.inner), edit:
            result = self.inner(attn, hidden_states, *args, **kwargs)
        if edit.calls == 0:
            raise RuntimeError(
                _without_sdpa(self.inner, self.path)
                or f"perturbed attention could not reach the attention of layer {self.path!r}: its processor "
                f"{type(innermost(self.inner)).__name__} made no torch scaled_dot_product_attention call (a processor "
                "computing attention itself, not through torch's SDPA or diffusers' dispatch_attention_fn?). Use an "
                "SDPA processor (AttnProcessor2_0, or the model's default) for perturbed layers."
            )
        return result

    def _edit(
        self,
        plan: LayerPlan,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        call: dict[str, Any],
    ) -> torch.Tensor:
        """Blend the planned (row, head) pairs; SDPA's own scale is kept. Without autograd the fresh SDPA
        output is edited in place (one copy of it less at the peak)."""
        if call["attn_mask"] is not None and self.state.kind != "identity":
            raise NotImplementedError(
                f"kind={self.state.kind!r} on layer {self.path!r} with an attention mask is not supported; "
                "use kind='identity' (it does not depend on the map) or perturb an unmasked layer"
            )
        rows, heads, weights = plan.on(out.device)
        return perturb_heads(
            q,
            k,
            v,
            out,
            rows,
            heads,
            weights,
            self.state.kind,
            scale=call["scale"],
            temperature=self.state.temperature,
            image_tokens=self.state.image_tokens(q.shape[-2], self.text_first),
            attn_mask=call["attn_mask"],
            inplace=not torch.is_grad_enabled(),
        )
