"""Site discovery and head specs on the real ComfyUI U-Net: ComfyUI's block keys and diffusers' names agree."""

from __future__ import annotations

import pytest
import torch

from attnsurgery.comfy.patching import (
    call_generator,
    model_family,
    select_heads,
    select_layers,
    token_grid,
    unet_attention_sites,
)
from attnsurgery.inventory import describe
from attnsurgery.rng import keyed_generator
from tests.support.comfy.parity import diffusers_twin


def test_sites_carry_comfyui_keys_and_diffusers_paths(tiny):
    sites = unet_attention_sites(tiny.model)
    blocks = [site.block for site in sites]
    assert blocks == (
        [("input", n) for n in (1, 2, 4, 5, 7, 8)] + [("middle", 0)] + [("output", n) for n in range(3, 12)]
    )
    twin = {name: module for name, module in diffusers_twin().named_modules() if name.endswith(".attn1")}
    assert sorted(site.path for site in sites) == sorted(twin)
    assert all(site.heads == twin[site.path].heads == 8 for site in sites)
    assert {site.level for site in sites if site.path.startswith(("down_blocks.0", "up_blocks.3"))} == {0}
    assert {site.level for site in sites if site.path.startswith("mid_block")} == {3}


def test_head_specs(tiny):
    sites = unet_attention_sites(tiny.model)
    top = select_layers(sites, "top")
    assert top == {("input", 1, 0), ("input", 2, 0), ("output", 9, 0), ("output", 10, 0), ("output", 11, 0)}
    chosen = select_heads(sites, "up_blocks.1.attentions.0:0,3 mid_block; up_blocks.1.attentions.0:5")
    assert {site.path: heads for site, heads in chosen.items()} == {
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1": [0, 3, 5],
        "mid_block.attentions.0.transformer_blocks.0.attn1": list(range(8)),
    }
    assert (
        select_heads(sites, '["down_blocks.*.attentions.1.*:2"]').keys()
        == select_heads(
            sites,
            '{"down_blocks.0.attentions.1.transformer_blocks.0.attn1": [2], '
            '"down_blocks.1.attentions.1.transformer_blocks.0.attn1": [2], '
            '"down_blocks.2.attentions.1.transformer_blocks.0.attn1": [2]}',
        ).keys()
    )
    with pytest.raises(ValueError, match="empty head spec"):
        select_heads(sites, "  ")


@pytest.mark.parametrize(
    "spec",
    [
        "top",
        "mid",
        "down",
        "up",
        "all",
        "up_blocks.*.attentions.0",
        "down_blocks.1",
        "**.attentions.1.**",
        "up_blocks.?.attentions.2.transformer_blocks.0.attn1",
    ],
)
def test_nodes_select_what_the_plugins_select(tiny, spec):
    """One grammar: a node and a diffusers plugin given the same selector act on the same self-attention layers."""
    plugin_layers = {layer.path for layer in describe(diffusers_twin()).select(spec, kinds=("self",))}
    assert plugin_layers  # an empty selection on both sides would agree vacuously
    assert {site.path for site in select_heads(unet_attention_sites(tiny.model), spec)} == plugin_layers


def test_node_selectors_are_anchored_and_list_the_layers(tiny):
    sites, family = unet_attention_sites(tiny.model), model_family(tiny.model)
    with pytest.raises(ValueError) as error:  # '*' stays inside one path segment
        select_layers(sites, "down_blocks.*.attn1", family)
    message = str(error.value)
    assert "matches no self-attention layer of this sd15 model" in message
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1  (self, 8 heads)" in message
    assert "top, mid, down, up, all" in message
    with pytest.raises(ValueError, match="matches no self-attention layer"):  # enclosing paths end at a dot
        select_layers(sites, "up_blocks.1.attention", family)
    assert select_layers(sites, "mid_block,up_blocks.3.attentions.2", family) == {("middle", 0, 0), ("output", 11, 0)}
    with pytest.raises(ValueError, match="must be a head index"):
        select_heads(sites, "mid_block:x", family)


def test_token_grid():
    assert token_grid([2, 4, 12, 20], 240) == (12, 20)
    assert token_grid([2, 4, 13, 21], 7 * 11) == (7, 11)
    with pytest.raises(ValueError, match="match no level"):
        token_grid([2, 4, 16, 16], 77)


def test_nodes_draw_from_the_librarys_keyed_generator():
    extra_options = {"block": ("input", 1), "block_index": 0, "sigmas": torch.tensor([14.614642, 14.614642])}
    drawn = torch.rand(4, generator=call_generator(7, extra_options))
    assert torch.equal(drawn, torch.rand(4, generator=keyed_generator(7, ("input", 1), 0, 14.61464)))
    assert torch.equal(drawn, torch.rand(4, generator=call_generator(7, extra_options)))
    assert not torch.equal(drawn, torch.rand(4, generator=call_generator(8, extra_options)))
