"""Small plugins that exercise the recording API; they exist only for the foundation's tests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from attnsurgery.plugins.base import Plugin
from attnsurgery.processors.base import WrappingProcessor


@dataclass(frozen=True)
class Recorder(Plugin):
    """Records a copy of the step context at every denoiser call."""

    log: list = field(default_factory=list, compare=False, repr=False)

    def attach(self, surgery) -> None:
        context = surgery.context

        def record(module, args, kwargs):
            self.log.append(
                {f.name: getattr(context, f.name) for f in dataclasses.fields(context) if f.name != "family"}
            )

        surgery.add_hook(surgery.denoiser, record, pre=True, with_kwargs=True)


class ScaledOutput(WrappingProcessor):
    """Scales the attention output; raises at a chosen step to test restores after failures."""

    def __init__(self, inner, factor: float, context=None, fail_at_step: int | None = None):
        super().__init__(inner)
        self.factor = factor
        self.context = context
        self.fail_at_step = fail_at_step

    def __call__(self, attn, hidden_states, *args, **kwargs):
        if self.fail_at_step is not None and self.context.step_index == self.fail_at_step:
            raise RuntimeError("injected failure inside a denoising step")
        out = self.inner(attn, hidden_states, *args, **kwargs)
        if isinstance(out, tuple):  # joint attention returns (image, text) streams
            return tuple(self.factor * o if o is not None else None for o in out)
        return self.factor * out


class DoubledConv(torch.nn.Module):
    """Wraps a conv and doubles its output (a module swap that holds the original)."""

    def __init__(self, original: torch.nn.Module):
        super().__init__()
        self.original = original

    def forward(self, x):
        return 2 * self.original(x)


@dataclass(frozen=True)
class Everything(Plugin):
    """One change of every kind the surgery records: processor, module, hook, attributes."""

    layers: str = "top"
    role: str = "heads"
    fail_at_step: int | None = None

    def attach(self, surgery) -> None:
        for layer in surgery.model.select(self.layers, kinds=("self", "joint", "single")):
            inner = layer.module.processor
            surgery.set_processor(layer, ScaledOutput(inner, 0.5, surgery.context, self.fail_at_step), role=self.role)
        denoiser = surgery.denoiser
        if hasattr(denoiser, "conv_in"):
            surgery.swap_module("conv_in", DoubledConv(denoiser.conv_in), role="module")
        surgery.add_hook(denoiser, lambda module, args, output: output, pre=False)
        surgery.set_attr(denoiser, "attnsurgery_marker", "added")  # did not exist before
        surgery.set_attr(denoiser, "training", denoiser.training)  # existed in __dict__
        if surgery.pipeline is not None:
            surgery.set_attr(surgery.pipeline, "attnsurgery_marker", 1)
