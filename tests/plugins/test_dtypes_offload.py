"""Dtypes and devices follow the model at call time (issue 17, point 4): diffusers' layerwise casting (float8
storage, bf16 or fp16 compute) and group offloading, enabled before or after apply, under every plugin. On
main ConvFusion took its dtype from the stored weights: float8 blocks, and a crash in either order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import attnsurgery as surg
from tests.support.matrix import PLUGINS, UNET_PX, changed, denoiser, sd15
from tests.support.pipes import run_pipe

# latents: a VAE decode in half precision takes seconds on a CPU
CASES = {
    name: (builder, plugin, {**kwargs, "output_type": "latent"})
    for name, (builder, plugin, kwargs) in {
        **PLUGINS,
        "sd15-convfusion": (sd15, surg.ConvFusion, dict(size=UNET_PX)),
    }.items()
}
CPU = torch.device("cpu")


def _layerwise(compute: torch.dtype) -> Callable[[Any], None]:
    def enable(pipe: Any) -> None:
        denoiser(pipe).enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)

    return enable


def _group_offload(pipe: Any) -> None:
    """Leaf level: every Linear and Conv onloads itself; modules read without being called stay where they are
    (the CPU is both devices here, so this checks the hooks and dtypes, not the transfers)."""
    denoiser(pipe).enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type="leaf_level")


def _feature_on(pipe: Any, feature: str) -> bool:
    """Whether ``feature`` took hold of the denoiser: float8 storage, or diffusers' offload hooks on its layers
    (CPU to CPU offloading changes no number, so only the hooks can show it is there)."""
    model = denoiser(pipe)
    if feature.startswith("layerwise"):
        return any(p.dtype == torch.float8_e4m3fn for p in model.parameters())
    return any(
        getattr(module, "_diffusers_hook", None) is not None
        and module._diffusers_hook.get_hook("group_offloading") is not None
        for module in model.modules()
    )


#: feature -> (model dtype, what enables it)
FEATURES = {
    "layerwise-fp8-bf16": (torch.bfloat16, _layerwise(torch.bfloat16)),
    "layerwise-fp8-fp16": (torch.float16, _layerwise(torch.float16)),
    "group_offload": (torch.bfloat16, _group_offload),
}


# fp16 storage for every plugin would double the time; the processors compute in their input's dtype alike
HALF_CASES = ("sd15-convfusion", "sd15-hidiffusion", "flux-agent")
MATRIX = [(case, feature) for case in CASES for feature in FEATURES if "fp16" not in feature or case in HALF_CASES]


@pytest.mark.parametrize(("case", "feature"), MATRIX)
def test_a_plugin_under_casting_or_offload_in_either_order(case, feature):
    builder, plugin, kwargs = CASES[case]
    dtype, enable = FEATURES[feature]
    first, second = builder().to(dtype), builder().to(dtype)
    assert not _feature_on(first, feature)
    enable(first)  # the feature, then the plugin
    assert _feature_on(first, feature), "the feature must take hold, or the orders compare nothing"
    plain = run_pipe(first, **kwargs)
    with surg.patched(first, plugin()):
        before = run_pipe(first, **kwargs)
    assert torch.equal(run_pipe(first, **kwargs), plain)
    assert before.isfinite().all() and changed(before, plain), "the plugin must act under the feature"
    with surg.patched(second, plugin()):  # the plugin, then the feature
        if case == "sd15-convfusion":
            with pytest.raises(RuntimeError, match=r"refused while ConvFusion replaces the attn1 layers"):
                enable(second)
            return
        enable(second)
        assert _feature_on(second, feature), "the feature enabled after apply must take hold"
        assert torch.equal(run_pipe(second, **kwargs), before)
    assert torch.equal(run_pipe(second, **kwargs), plain)


def test_convfusion_blocks_take_the_compute_dtype_not_the_storage_dtype():
    pipe = sd15().to(torch.bfloat16)
    _layerwise(torch.bfloat16)(pipe)
    assert _feature_on(pipe, "layerwise"), "float8 storage, or a bfloat16 model passes trivially"
    with surg.patched(pipe, surg.ConvFusion()):
        blocks = surg.ConvFusion.extract(pipe).blocks
        assert {p.dtype for block in blocks.values() for p in block.parameters()} == {torch.bfloat16}


def test_to_after_convfusion_also_moves_the_attention_it_set_aside():
    """``pipe.to(dtype)`` after apply left the set-aside attn1 modules in float32: a dtype error after remove."""
    pipe = sd15()
    handle = surg.apply(pipe, surg.ConvFusion())
    pipe.to(torch.bfloat16)
    blocks = run_pipe(pipe, size=UNET_PX)
    handle.remove()
    assert {p.dtype for p in denoiser(pipe).parameters()} == {torch.bfloat16}
    assert changed(run_pipe(pipe, size=UNET_PX), blocks)
