"""Every DiT plugin under every diffusers attention backend this machine runs: the same attention calls as
under the native backend, computed by the chosen one (where it takes them), the same output, exact restore;
a backend chosen after apply reaches the wrapped layers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import attention_backend
from torch.overrides import TorchFunctionMode

import attnsurgery as surg
from attnsurgery import AgentAttention, NeighborhoodAttention, PerturbedAttention, TokenMerging
from attnsurgery.processors.sdpa_intercept import sdpa_arguments
from attnsurgery.testing import restore
from tests.support.attention_backends import backend_calls, runnable_backends
from tests.support.dit_families import build, latents

PLUGINS = {
    "pag-heads": PerturbedAttention(scale=2.0, heads=["transformer_blocks.1.attn:1", (2, 0)]),
    "neighborhood": NeighborhoodAttention(window=2, backend="tiles"),  # tiles: SDPA calls, with masks
    "tome": TokenMerging(ratio=0.5),
    "agent": AgentAttention(),
}
OTHER_BACKENDS = [backend for backend in runnable_backends() if backend != "native"]
# diffusers declares flash for bfloat16/float16 only, and it takes no mask: run it where it is meant to run.
DTYPES = {"_native_flash": torch.bfloat16}


def _takes(backend: str, masked: bool, dtype: torch.dtype) -> bool:
    """Whether diffusers' ``backend`` takes a call (the others go to torch SDPA): flash takes unmasked half
    precision only, which leaves it none of ToMe's calls (proportional attention is a mask) nor the agents'
    (computed in float32 in half-precision models)."""
    return backend != "_native_flash" or (not masked and dtype in (torch.bfloat16, torch.float16))


class _SdpaCalls(TorchFunctionMode):
    """(batch, heads, queries, keys, masked, dtype) of every torch SDPA call made inside ``model`` that reaches the
    bottom of the mode stack (entered before the plugins' modes, so it sees what they compute with)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.inside, self.seen = model, False, []

    def __enter__(self):
        self.hooks = [
            self.model.register_forward_pre_hook(lambda *_: setattr(self, "inside", True)),
            self.model.register_forward_hook(lambda *_: setattr(self, "inside", False)),
        ]
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.inside:
            call = sdpa_arguments(*args, **kwargs)
            q, k = call["query"], call["key"]
            self.seen.append((*q.shape[:3], k.shape[2], call["attn_mask"] is not None, q.dtype))
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def flux():
    return build("flux")


@contextmanager
def _dtype(pipe, dtype: torch.dtype) -> Iterator[None]:
    pipe.to(dtype)
    try:
        yield
    finally:
        pipe.to(torch.float32)


def _with(pipe, plugin) -> torch.Tensor:
    with surg.patched(pipe, plugin):
        return latents(pipe, "flux", steps=1).float()


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize("plugin", sorted(PLUGINS))
def test_the_plugin_computes_through_the_chosen_backend(flux, plugin, backend):
    """The calls reaching the backend are the SDPA calls the model makes with the plugin under native (those the
    backend takes), and the output is native's within the kernels' difference."""
    with _dtype(flux, DTYPES.get(backend, torch.float32)):
        plain = latents(flux, "flux", steps=1).float()
        with _SdpaCalls(flux.transformer) as native:
            expected = _with(flux, PLUGINS[plugin])
        assert (expected - plain).abs().max() > 1e-2 * plain.abs().max()  # the plugin acts
        before = restore.snapshot(flux)
        with attention_backend(backend), backend_calls(backend) as seen:
            out = _with(flux, PLUGINS[plugin])
        restore.assert_restored(flux, before)
    assert native.seen, "the plugin's calls must be recorded, or the call lists compare two empty ones"
    through = [call[:4] for call in native.seen if _takes(backend, *call[4:])]
    assert sorted(seen) == sorted(through)
    assert through or plugin in ("tome", "agent") and backend == "_native_flash"
    tolerance = 2e-2 if backend in DTYPES else 1e-4
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


@pytest.mark.parametrize("plugin", ["pag-heads", "tome"])
def test_a_masked_family_under_flex_equals_native(plugin):
    """Chroma masks every layer's text padding: flex takes the mask (made additive) and gives native's output."""
    pipe = build("chroma")
    plain = latents(pipe, "chroma", steps=1)
    with surg.patched(pipe, PLUGINS[plugin]):
        expected = latents(pipe, "chroma", steps=1)
        with attention_backend("flex"), backend_calls("flex") as seen:
            out = latents(pipe, "chroma", steps=1)
    assert (expected - plain).abs().max() > 1e-2 * plain.abs().max() and seen
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_a_backend_set_after_apply_reaches_the_wrapped_layers_and_stays_after_remove():
    """set_attention_backend after apply: the wrapped layers compute in it too (every call the model makes under
    native reaches flex), also where an earlier choice was set on their processors; remove() keeps it."""
    pipe = build("flux")
    pipe.transformer.set_attention_backend("native")  # set on every processor: a user's earlier choice
    layer = pipe.transformer.transformer_blocks[1].attn
    handle = surg.apply(pipe, PLUGINS["pag-heads"])
    with _SdpaCalls(pipe.transformer) as native:
        latents(pipe, "flux", steps=1)
    pipe.transformer.set_attention_backend("flex")
    with backend_calls("flex") as seen:
        latents(pipe, "flux", steps=1)
    handle.remove()
    pipe.transformer.reset_attention_backend()  # the active backend diffusers set stays flex: back to native
    pipe.transformer.set_attention_backend("native")
    assert native.seen, "the calls under native must be recorded, or flex's are compared with none"
    assert sorted(seen) == sorted(call[:4] for call in native.seen)
    assert layer.processor._attention_backend == "native"
