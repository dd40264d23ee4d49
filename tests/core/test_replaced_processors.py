"""diffusers calls that replace attention processors after apply (issue 17, point 1): the next denoiser call
names the layer, the new processor and the fix; remove() keeps the user's processors; the plugins re-apply."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from safetensors.torch import save_file

import attnsurgery as surg
from attnsurgery.processors.base import WrappingProcessor
from tests.support.pipes import run_pipe


def _processors(pipe) -> dict:
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    return dict(denoiser.attn_processors)


def _ours(pipe) -> list[str]:
    return [name for name, processor in _processors(pipe).items() if isinstance(processor, WrappingProcessor)]


def _top_pag() -> surg.PerturbedAttention:
    """At 64 px the mid block holds one token, where an identity map changes nothing: take the top level."""
    return surg.PerturbedAttention(layers="top")


CASES = {
    "sd15-set_attn_processor": ("sd15", _top_pag, lambda p: p.unet.set_attn_processor(AttnProcessor2_0())),
    "sdxl-attention_slicing": ("sdxl", surg.TokenMerging, lambda p: p.enable_attention_slicing()),
    "sd15-fuse_qkv": ("sd15", surg.TokenMerging, lambda p: p.fuse_qkv_projections()),
    "sd3-fuse_qkv": ("sd3", surg.PerturbedAttention, lambda p: p.transformer.fuse_qkv_projections()),
    "flux-set_attn_processor": (
        "flux",
        surg.PerturbedAttention,
        lambda p: p.transformer.set_attn_processor(FluxAttnProcessor()),
    ),
}
REPLACED_BY = {
    "sd15-set_attn_processor": "AttnProcessor2_0",
    "sdxl-attention_slicing": r"SlicedAttnProcessor \(enable_attention_slicing\(\)\)",
    "sd15-fuse_qkv": r"FusedAttnProcessor2_0 \(fuse_qkv_projections\(\)\)",
    "sd3-fuse_qkv": r"FusedJointAttnProcessor2_0 \(fuse_qkv_projections\(\)\)",
    "flux-set_attn_processor": "FluxAttnProcessor",
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_replaced_processor_is_named_and_remove_keeps_the_users(case, request):
    name, plugin, diffusers_call = CASES[case]
    pipe = request.getfixturevalue(name)
    handle = surg.apply(pipe, plugin())
    site = handle.sites[1]  # the first layer the plugin changed (after the denoiser's hooks)
    diffusers_call(pipe)
    users = _processors(pipe)
    with pytest.raises(RuntimeError, match=rf"installed at {site}.*replaced after apply by {REPLACED_BY[case]}"):
        run_pipe(pipe, steps=1)
    handle.remove()
    assert all(_processors(pipe)[key] is value for key, value in users.items()), "remove() put old processors back"
    plain = run_pipe(pipe, steps=1)
    with surg.patched(pipe, plugin()):  # the plugin applies again, over the processors the user chose
        assert (run_pipe(pipe, steps=1) - plain).abs().max() > 0
    assert all(_processors(pipe)[key] is value for key, value in users.items())


def test_unfuse_after_remove_does_not_bring_our_processors_back(sd15):
    """fuse_qkv_projections keeps the processors it replaces (ours) for unfuse_qkv_projections."""
    before = _processors(sd15)
    handle = surg.apply(sd15, surg.TokenMerging())
    sd15.fuse_qkv_projections()
    handle.remove()
    sd15.unfuse_qkv_projections()
    assert not _ours(sd15)
    assert all(_processors(sd15)[key] is value for key, value in before.items())


def test_stacked_surgeries_on_one_layer_are_not_taken_for_a_replacement(sd15):
    """A later surgery wraps the earlier one's processor: that is no replacement."""
    first = surg.apply(sd15, surg.TokenMerging(layers="top"))
    second = surg.apply(sd15, surg.PerturbedAttention(layers="top"))
    run_pipe(sd15, steps=1)
    second.remove()
    first.remove()
    assert not _ours(sd15)


def _ip_adapter_folder(tmp_path, unet) -> str:
    """A random-weight IP-Adapter (base image projection) for the tiny U-Net, in diffusers' file layout."""
    cross, clip, tokens = unet.config.cross_attention_dim, 16, 4
    tensors = {
        "image_proj.proj.weight": torch.randn(tokens * cross, clip),
        "image_proj.proj.bias": torch.zeros(tokens * cross),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    cross_layers = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for index, name in enumerate(cross_layers):
        key = 2 * index + 1  # diffusers counts attn1 and attn2 processors, IP-Adapter weights sit on attn2
        width = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        tensors[f"ip_adapter.{key}.to_k_ip.weight"] = torch.randn(width, cross)
        tensors[f"ip_adapter.{key}.to_v_ip.weight"] = torch.randn(width, cross)
    save_file(tensors, str(tmp_path / "ip.safetensors"))
    return str(tmp_path)


def test_ip_adapter_load_and_unload_name_the_fix(sd15, tmp_path):
    """Both calls rebuild every processor from its class; ours need the processor they wrap."""
    folder = _ip_adapter_folder(tmp_path, sd15.unet)
    load = dict(subfolder="", weight_name="ip.safetensors", image_encoder_folder=None)
    with surg.patched(sd15, surg.PerturbedAttention()):
        with pytest.raises(TypeError, match=r"load_ip_adapter\(\) and unload_ip_adapter\(\).*remove\(\)"):
            sd15.load_ip_adapter(folder, **load)
    sd15.load_ip_adapter(folder, **load)
    with surg.patched(sd15, surg.PerturbedAttention()):
        with pytest.raises(TypeError, match="PerturbationProcessor wraps a layer's own processor"):
            sd15.unload_ip_adapter()
    sd15.unload_ip_adapter()
    assert not _ours(sd15)
