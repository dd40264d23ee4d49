"""diffusers' caches with every DiT plugin (issue 17, point 2). On main, FLUX with FirstBlockCache plus
PerturbedAttention(mode="sequential") added nothing (difference to cache-only <= 7e-7 against a PAG effect of
0.70): the perturbed pass read the conditional pass's cache. It now has a cache context of its own, and caches
that keep one state for every call (PyramidAttentionBroadcast, FasterCache) are refused. U-Nets have no
``enable_cache``. diffusers' FasterCache fails on FLUX by itself, so it is checked only for the refusal."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

import attnsurgery as surg
from tests.support import dit_families
from tests.support.matrix import FLUX_PX, PLUGINS, changed, denoiser
from tests.support.pipes import run_pipe

STEPS = 6  # a cache acts from the second step on: several steps, so that it reuses something


def _run(pipe: Any, name: str) -> torch.Tensor:
    kwargs = dit_families.FAMILIES[name][1]
    return run_pipe(pipe, size=FLUX_PX, steps=STEPS, output_type="latent", **kwargs)


#: cache -> config for a pipeline; thresholds high enough that the tiny models reuse their caches
CACHES: dict[str, Callable[[Any], Any]] = {
    "first_block": lambda pipe: FirstBlockCacheConfig(threshold=10.0),
    "taylorseer": lambda pipe: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1),
    "magcache": lambda pipe: MagCacheConfig(
        threshold=10.0, num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS, retention_ratio=0.0
    ),
}
BLIND_CACHES: dict[str, Callable[[Any], Any]] = {
    "pyramid_attention_broadcast": lambda pipe: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep,
    ),
    "faster_cache": lambda pipe: FasterCacheConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep,
        attention_weight_callback=lambda _: 0.5,
        is_guidance_distilled=True,
    ),
}
# the DiT families whose transformers have enable_cache and whose pipelines set cache contexts (the Chroma and
# FLUX.2 pipelines set none: diffusers' caches fail there by themselves; SD3 and Z-Image have no enable_cache)
CACHED_FAMILIES = ("flux", "qwenimage")


@pytest.mark.parametrize("stop", [1.0, 0.5])
@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("name", CACHED_FAMILIES)
def test_sequential_pag_under_a_cache_equals_batched(name, cache, stop):
    """Also when PAG stops halfway: batched rows that came and went turned FirstBlockCache's one-row
    prediction into two rows (under a cache the perturbed rows now always take their own pass)."""
    pipe = dit_families.build(name)
    plain = _run(pipe, name)
    denoiser(pipe).enable_cache(CACHES[cache](pipe))
    cached = _run(pipe, name)
    with surg.patched(pipe, surg.PerturbedAttention(mode="sequential", stop=stop)):
        sequential = _run(pipe, name)
    with surg.patched(pipe, surg.PerturbedAttention(stop=stop)):
        batched = _run(pipe, name)
    assert changed(cached, plain), "the cache must reuse something"
    assert changed(sequential, cached), "PAG must act under the cache"
    assert batched.shape == cached.shape
    assert torch.equal(sequential, batched)
    assert torch.equal(_run(pipe, name), cached)


@pytest.mark.parametrize("mode", ["sequential", "batched"])
@pytest.mark.parametrize("cache", list(BLIND_CACHES))
def test_pag_refuses_a_cache_shared_by_every_call(cache, mode):
    pipe = dit_families.build("flux")
    plugin = surg.PerturbedAttention(mode=mode)
    message = r"cannot run under .*Config: .*disable_cache\(\)"
    denoiser(pipe).enable_cache(BLIND_CACHES[cache](pipe))
    with pytest.raises(RuntimeError, match=message):
        surg.apply(pipe, plugin)
    assert surg.active_surgeries(pipe) == []
    denoiser(pipe).disable_cache()
    with surg.patched(pipe, plugin):  # enabled after apply: the first call refuses
        denoiser(pipe).enable_cache(BLIND_CACHES[cache](pipe))
        with pytest.raises(RuntimeError, match=message):
            _run(pipe, "flux")


@functools.cache
def _uncached_flux() -> torch.Tensor:
    """The plain FLUX run without a cache, once: what every cache must change for its two orders to differ."""
    return _run(dit_families.build("flux"), "flux")


DIT_PLUGINS = {case: entry for case, entry in PLUGINS.items() if case.startswith("flux-") and case != "flux-pag"}


@pytest.mark.parametrize("cache", [*CACHES, "pyramid_attention_broadcast"])
@pytest.mark.parametrize("case", list(DIT_PLUGINS))
def test_a_token_plugin_under_a_cache_in_either_order(case, cache):
    """Merging, agents and neighborhood attention change attention inside the call a cache stores, so every
    cache keeps them; the cache enabled before or after apply gives the same result."""
    make = {**CACHES, **BLIND_CACHES}[cache]
    _, plugin, _ = DIT_PLUGINS[case]
    first, second = dit_families.build("flux"), dit_families.build("flux")
    denoiser(first).enable_cache(make(first))
    cached = _run(first, "flux")
    with surg.patched(first, plugin()):
        before = _run(first, "flux")
    with surg.patched(second, plugin()):
        denoiser(second).enable_cache(make(second))
        after = _run(second, "flux")
    assert changed(before, cached), "the plugin must act under the cache"
    assert changed(cached, _uncached_flux()), "the cache must reuse something, or either order is no cache"
    assert torch.equal(after, before)
