"""Write your own plugin on the Surgery API: swap a processor, add a hook, claim a role, restore exactly.

The plugin below sharpens self-attention (scales its logits by ``1 / temperature``) in the layers a
selector picks, but only in the first part of the denoising run, which it reads from the step clock. It
makes every change through the surgery, so ``remove()`` undoes it, and ``assert_restored`` proves it.

    python examples/write_your_own_plugin.py --steps 10
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import attnsurgery as surg
from attnsurgery.pipelines.loading import load_pipeline
from attnsurgery.processors.base import WrappingProcessor
from attnsurgery.processors.sdpa_intercept import FirstAttentionCall
from attnsurgery.reference.model import GUIDANCE_SCALE
from attnsurgery.testing import assert_restored, snapshot


class SharpenedSelfAttention(WrappingProcessor):
    """The model's own processor, with the logits of its attention call divided by ``temperature``
    while ``active()``: the processor still does its projections, norms and RoPE; we only redo its SDPA."""

    def __init__(self, inner, temperature: float, active) -> None:
        super().__init__(inner)  # keeps the model's own processor, so remove() can put it back
        self.temperature, self.active = temperature, active

    def sharpen(self, q, k, v, out, call):
        scale = call["scale"] if call["scale"] is not None else q.shape[-1] ** -0.5
        return F.scaled_dot_product_attention(q, k, v, attn_mask=call["attn_mask"], scale=scale / self.temperature)

    def __call__(self, attn, hidden_states, *args, **kwargs):
        if not self.active():
            return self.inner(attn, hidden_states, *args, **kwargs)
        with FirstAttentionCall(self.sharpen) as mode:
            out = self.inner(attn, hidden_states, *args, **kwargs)
        if mode.calls == 0:  # never silent: an attention backend we cannot see did the work
            raise RuntimeError(f"{type(self.inner).__name__} attended without F.scaled_dot_product_attention")
        return out


@dataclass(frozen=True)
class SharpenEarly(surg.Plugin):
    """Sharper self-attention in ``layers`` while the run's progress is below ``until``."""

    layers: str = "top"
    temperature: float = 0.5
    until: float = 0.5

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (below 1 sharpens), got {self.temperature}")

    def attach(self, surgery: surg.Surgery) -> None:
        context = surgery.context  # the step clock: progress in [0, 1] from the timestep the denoiser gets
        calls = []

        def active() -> bool:
            return context.progress < self.until

        for layer in surgery.model.select(self.layers, kinds=("self",)):
            processor = SharpenedSelfAttention(layer.module.processor, self.temperature, active)
            surgery.set_processor(layer, processor, role="tokens")  # a claim: a second 'tokens' plugin fails
        surgery.add_hook(
            surgery.denoiser, lambda module, args, kwargs: calls.append(context.progress), pre=True, with_kwargs=True
        )
        surgery.set_attr(surgery.denoiser, "sharpen_early_calls", calls)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", default="a red circle")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)

    pipe = load_pipeline("reference")
    pipe.set_progress_bar_config(disable=True)

    def run() -> torch.Tensor:
        out = pipe(
            args.prompt,
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE_SCALE,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        )
        return out.images

    plain, before = run(), snapshot(pipe)
    with surg.patched(pipe, SharpenEarly()) as handle:
        sharpened = run()
        calls = pipe.unet.sharpen_early_calls
        print(
            f"changed {len(handle.sites)} sites; the hook saw {len(calls)} denoiser calls, "
            f"progress {calls[0]:.2f} .. {calls[-1]:.2f}"
        )
        try:
            surg.apply(pipe, SharpenEarly())
        except ValueError as error:
            print(f"a second plugin claiming the same layers is refused: {str(error).splitlines()[0]}")
    assert_restored(pipe, before)
    assert torch.equal(run(), plain), "remove() must give the plain pipeline back"
    print(f"max pixel change while patched {(sharpened - plain).abs().max():.3f}; restored exactly")


if __name__ == "__main__":
    main()
