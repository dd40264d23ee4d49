"""The route to the user's diffusers attention backend: which backend a layer uses, the calls each backend
computes (torch SDPA computes the rest, logged), and the processor's own choice put back."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from attnsurgery.processors import attention_backend as attention_backend_module
from attnsurgery.processors.attention_backend import BackendRoute, layer_backend, layer_backend_route
from attnsurgery.processors.base import WrappingProcessor
from tests.support.attention_backends import backend_calls, runnable_backends

OTHER_BACKENDS = [backend for backend in runnable_backends() if backend != "native"]
HALF_ONLY = {"_native_flash"}  # and it raises on a mask


def _masks(q: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """SDPA's mask forms: none, 4-D float, 4-D bool (a padded key), 2-D [queries, keys] bool."""
    keep = torch.ones(q.shape[0], 1, 1, k.shape[2], dtype=torch.bool)
    keep[0, ..., -2:] = False
    generator = torch.Generator().manual_seed(1)
    return {
        "none": None,
        "float": torch.randn(q.shape[0], 1, q.shape[2], k.shape[2], generator=generator),
        "bool": keep,
        "2d": torch.rand(q.shape[2], k.shape[2], generator=generator) > 0.2,
    }


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_each_backend_computes_what_it_takes_and_torch_the_rest(backend, caplog, monkeypatch):
    """Every mask form; flash takes none of these float32 calls (declared for half precision, and no mask)."""
    monkeypatch.setattr(attention_backend_module, "_logged", set())  # each reason is logged once per process
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=generator) for n in (5, 7, 7))
    unmasked = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    for name, mask in _masks(q, k).items():
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        if mask is not None:  # a backend that dropped the mask must fail the comparison
            assert (expected - unmasked).abs().max() > 1e-2, name
        with caplog.at_level(logging.INFO), backend_calls(backend) as seen, BackendRoute(AttentionBackendName(backend)):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert seen == ([] if backend in HALF_ONLY else [(2, 3, 5, 7)]), name
    if backend in HALF_ONLY:
        assert "bfloat16 or float16" in caplog.text and "takes no dense attention mask" in caplog.text


def test_flash_computes_unmasked_half_precision_calls():
    q = torch.randn(1, 2, 6, 16, dtype=torch.bfloat16)
    with backend_calls("_native_flash") as seen, BackendRoute(AttentionBackendName._NATIVE_FLASH):
        out = F.scaled_dot_product_attention(q, q, q)
    assert seen == [(1, 2, 6, 6)] and torch.equal(out, F.scaled_dot_product_attention(q, q, q))


def test_the_layer_backend_is_the_processors_else_the_active_one_and_none_for_torch_sdpa():
    flux = FluxAttnProcessor()
    assert layer_backend(flux) is None and layer_backend(AttnProcessor2_0()) is None
    with attention_backend("flex"):
        assert layer_backend(WrappingProcessor(flux)) == AttentionBackendName.FLEX  # read at call time
        assert layer_backend(AttnProcessor2_0()) is None  # U-Net/SD3 processors call torch SDPA themselves
        flux._attention_backend = "native"  # set_attention_backend's choice wins over the active one
        assert layer_backend(flux) is None
    flux._attention_backend = "_native_math"
    assert layer_backend(flux) == AttentionBackendName._NATIVE_MATH


def test_a_wrapper_passes_the_backend_attribute_to_the_processor_it_wraps():
    flux, unet = FluxAttnProcessor(), AttnProcessor2_0()
    wrapper = WrappingProcessor(WrappingProcessor(flux))
    wrapper._attention_backend = "flex"  # what set_attention_backend does to every processor that has one
    assert flux._attention_backend == "flex" and "_attention_backend" not in vars(wrapper)
    assert not hasattr(WrappingProcessor(unet), "_attention_backend")  # skipped, as the bare processor is


@pytest.mark.parametrize("own", [None, "flex"])
def test_the_processors_own_backend_is_put_back_also_after_an_error_and_under_compile(own):
    flux = FluxAttnProcessor()
    if own:
        flux._attention_backend = own
    before = dict(vars(flux))

    def call(q):
        with layer_backend_route(flux):
            return F.scaled_dot_product_attention(q, q, q)

    q = torch.randn(1, 2, 4, 8)
    with attention_backend("flex"):
        with pytest.raises(RuntimeError, match="inside"), layer_backend_route(flux):
            assert flux._attention_backend == AttentionBackendName.NATIVE
            raise RuntimeError("inside")
        assert vars(flux) == before
        # torch 2.13 loses attribute writes made after a flex_attention call in a compiled graph
        out = torch.compile(call, fullgraph=True, backend="eager")(q)
    assert vars(flux) == before
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))
