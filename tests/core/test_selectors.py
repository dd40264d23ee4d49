import pytest

from attnsurgery.inventory import describe
from attnsurgery.selectors import groups_of, split_items
from attnsurgery.testing import tiny


@pytest.fixture(scope="module")
def sd3_info():
    pipe = tiny.tiny_sd3(num_layers=12)
    return describe(pipe.transformer, pipe.vae_scale_factor)


@pytest.fixture(scope="module")
def sd15_info():
    return describe(tiny.tiny_sd15().unet)


@pytest.fixture(scope="module")
def sdxl_info():
    return describe(tiny.tiny_sdxl().unet)


@pytest.fixture(scope="module")
def flux_info():
    return describe(tiny.tiny_flux().transformer)


def paths(layers):
    return [layer.path for layer in layers]


def test_block_path_is_anchored_and_never_hits_block_10(sd3_info):
    assert paths(sd3_info.select("transformer_blocks.1")) == ["transformer_blocks.1.attn"]
    assert paths(sd3_info.select("transformer_blocks.1.attn")) == ["transformer_blocks.1.attn"]
    # a prefix that is not at a dot boundary matches nothing
    with pytest.raises(ValueError, match="matches no attention layer"):
        sd3_info.select("transformer_blocks.1.at")


def test_globs_stay_inside_segments(sd3_info, sd15_info):
    assert len(sd3_info.select("transformer_blocks.1?")) == 2  # 10, 11
    assert len(sd3_info.select("transformer_blocks.*.attn")) == 12
    selected = sd15_info.select("up_blocks.*.attentions.0.**.attn1")
    assert paths(selected) == [f"up_blocks.{i}.attentions.0.transformer_blocks.0.attn1" for i in (1, 2, 3)]


def test_named_groups_on_unets(sd15_info, sdxl_info):
    top = sd15_info.select("top", kinds=("self",))
    assert {layer.level for layer in top} == {0}
    assert len(top) == 5  # down_blocks.0 x2 + up_blocks.3 x3: the top level AgentSD and HiDiffusion act on
    # SDXL has no attention at full resolution: its top attention level is the 64x64 one of a 1024 image
    sdxl_top = sdxl_info.select("top", kinds=("self",))
    assert {layer.path.split(".")[0] + "." + layer.path.split(".")[1] for layer in sdxl_top} == {
        "down_blocks.1",
        "up_blocks.1",
    }
    assert len(sdxl_top) == 10
    assert paths(sd15_info.select("mid", kinds=("self",))) == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert len(sd15_info.select("all")) == len(sd15_info.layers)
    assert all(layer.path.startswith("down_blocks.") for layer in sd15_info.select("down"))


def test_dit_groups_and_unet_only_groups(flux_info, sd3_info):
    assert paths(flux_info.select("single")) == ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    with pytest.raises(ValueError, match="group 'mid' does not exist on a sd3"):
        sd3_info.select("mid")


def test_empty_match_lists_existing_layers(sd15_info):
    with pytest.raises(ValueError) as error:
        sd15_info.select("down_blocks.7")
    message = str(error.value)
    assert "down_blocks.7" in message
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1  (self, 8 heads)" in message
    assert "top, mid, down, up, all" in message


def test_kind_filter_reports_what_was_asked(sd15_info):
    with pytest.raises(ValueError, match="of kind cross"):
        sd15_info.select("down_blocks.0.attentions.0.transformer_blocks.0.attn1", kinds=("cross",))


def test_head_specs(sd3_info, flux_info, sd15_info):
    assert sd3_info.select_heads("transformer_blocks.11:3") == {"transformer_blocks.11.attn": frozenset({3})}
    assert sd3_info.select_heads([(1, 0), (1, 2), "transformer_blocks.2"]) == {
        "transformer_blocks.1.attn": frozenset({0, 2}),
        "transformer_blocks.2.attn": None,
    }
    # FLUX numbers double-stream blocks first, then single-stream blocks
    assert flux_info.select_heads((2, 1)) == {"single_transformer_blocks.0.attn": frozenset({1})}
    layer = "mid_block.attentions.0.transformer_blocks.0.attn1"
    assert sd15_info.select_heads(f"{layer}:7") == {layer: frozenset({7})}


def test_several_heads_of_one_layer(sd3_info, sd15_info):
    assert sd3_info.select_heads("transformer_blocks.11:3,0") == {"transformer_blocks.11.attn": frozenset({0, 3})}
    # a selector that names several layers gives each of them those heads; items add up per layer
    layer = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    assert sd15_info.select_heads(["up_blocks.1.attentions.0:0,3", f"{layer}:5"], kinds=("self",)) == {
        layer: frozenset({0, 3, 5})
    }
    assert sd15_info.select_heads(["mid:1,2", "mid"], kinds=("self",)) == {
        "mid_block.attentions.0.transformer_blocks.0.attn1": None
    }
    with pytest.raises(ValueError, match="out of range: transformer_blocks.1.attn has heads 0..3"):
        sd3_info.select_heads("transformer_blocks.1:0,4")
    for bad in ("transformer_blocks.1:0,", "transformer_blocks.1:0,x", "transformer_blocks.1:"):
        with pytest.raises(ValueError, match="must be a head index or several"):
            sd3_info.select_heads(bad)


def test_split_items_keeps_head_lists_together():
    assert split_items("up_blocks.1.attentions.0:0,3 mid_block; top") == [
        "up_blocks.1.attentions.0:0,3",
        "mid_block",
        "top",
    ]
    assert split_items("a:0, 3,b\nc:1") == ["a:0,3", "b", "c:1"]
    assert split_items(" ; ") == []


def test_bad_head_specs_explain_the_fix(sd3_info, sd15_info):
    with pytest.raises(ValueError, match="out of range: transformer_blocks.1.attn has heads 0..3"):
        sd3_info.select_heads("transformer_blocks.1:4")
    with pytest.raises(ValueError, match="no block 40; this sd3 model has blocks 0..11"):
        sd3_info.select_heads((40, 0))
    with pytest.raises(ValueError, match="on a U-Net use 'path:head'"):
        sd15_info.select_heads((0, 0))
    with pytest.raises(ValueError, match="must be a head index"):
        sd3_info.select_heads("transformer_blocks.1:x")


def test_inventory_kinds_and_levels(sd15_info, flux_info):
    kinds = {layer.kind for layer in sd15_info.layers}
    assert kinds == {"self", "cross"}
    assert {layer.level for layer in sd15_info.layers} == {0, 1, 2, 3}
    mid = sd15_info.layer("mid_block.attentions.0.transformer_blocks.0.attn1")
    assert mid.level == 3 and mid.heads == 8
    assert [layer.kind for layer in flux_info.layers] == ["joint", "joint", "single", "single"]
    assert [layer.block_index for layer in flux_info.layers] == [0, 1, 2, 3]


def test_sd35_dual_attention_is_image_only_self_attention():
    info = describe(tiny.tiny_sd35().transformer)
    assert info.layer("transformer_blocks.0.attn2").kind == "self"
    assert info.layer("transformer_blocks.0.attn").kind == "joint"


@pytest.mark.parametrize(
    "builder, joint, single",
    [
        (tiny.tiny_flux2, 2, 2),
        (tiny.tiny_qwenimage, 2, 0),
        (tiny.tiny_zimage, 0, 2),
        (tiny.tiny_chroma, 2, 2),
    ],
)
def test_groups_and_block_heads_on_the_newer_dits(builder, joint, single):
    """`joint` and `single` groups exist where such layers do; (block, head) counts blocks in forward order, so
    on Z-Image block 4 is the first joint layer (after 2 noise and 2 context refiners)."""
    info = describe(builder().transformer)
    for group, count in (("joint", joint), ("single", single)):
        if count:
            assert len(info.select(group)) == count
        else:
            assert group not in groups_of(info)
            with pytest.raises(ValueError, match=f"group '{group}' does not exist"):
                info.select(group)
    last = info.layers[-1]
    assert info.select_heads([(last.block_index, 3)]) == {last.path: frozenset({3})}
    assert len(info.select("all")) == len(info.layers)


def test_zimage_text_only_layers_are_listed_by_kind():
    info = describe(tiny.tiny_zimage().transformer)
    assert paths(info.select("context_refiner", kinds=("text",))) == [
        "context_refiner.0.attention",
        "context_refiner.1.attention",
    ]
    assert info.select_heads([(4, 1)]) == {"layers.0.attention": frozenset({1})}
    with pytest.raises(ValueError, match=r"context_refiner.0.attention  \(text, 4 heads\)"):
        info.select("context_refiner.7")
