import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from attnsurgery.families import detect_family
from attnsurgery.testing import tiny

# Real configs, trimmed to what decides the family; built on the meta device (no memory for weights).
SD15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD21 = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SDXL = dict(
    sample_size=128,
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10),
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def meta_unet(**config):
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


@pytest.mark.parametrize(
    "config, name, native",
    [
        (SD15, "sd15", 512),
        (SD21, "sd2", 768),
        ({**SD21, "sample_size": 64}, "sd2", 512),
        (SDXL, "sdxl", 1024),
        ({**SDXL, "in_channels": 9}, "sdxl-inpaint", 1024),
    ],
)
def test_unet_families_from_real_configs(config, name, native):
    family = detect_family(meta_unet(**config), vae_scale_factor=8)
    assert family.name == name
    assert family.native_resolution == native
    assert family.kind == "unet"


def test_sd15_inpaint_is_flagged_but_stays_sd15():
    family = detect_family(meta_unet(**SD15, in_channels=9))
    assert (family.name, family.inpaint) == ("sd15", True)


@pytest.mark.parametrize(
    "builder, name, order",
    [
        (tiny.tiny_sd3, "sd3", "image_text"),
        (tiny.tiny_sd35, "sd35", "image_text"),
        (tiny.tiny_flux, "flux", "text_image"),
    ],
)
def test_dit_families(builder, name, order):
    pipe = builder()
    family = detect_family(pipe.transformer, pipe.vae_scale_factor)
    assert (family.name, family.kind, family.joint_order) == (name, "mmdit", order)


def test_tiny_unets_are_recognised_by_config_not_size():
    assert detect_family(tiny.tiny_sd15().unet).name == "sd15"
    assert detect_family(tiny.tiny_sdxl().unet).name == "sdxl"


def test_reference_scale_native_resolution_follows_vae_factor():
    # The reference model: sample_size 16 with a factor-4 VAE is a 64 px model.
    assert detect_family(meta_unet(**{**SD15, "sample_size": 16}), vae_scale_factor=4).native_resolution == 64


def test_unknown_architecture_names_what_was_found():
    with torch.device("meta"):
        model = UNet2DModel(sample_size=32)
    with pytest.raises(NotImplementedError, match="UNet2DModel.*sample_size=32"):
        detect_family(model)
    with pytest.raises(NotImplementedError, match="Linear has no diffusers `config`"):
        detect_family(torch.nn.Linear(2, 2))
