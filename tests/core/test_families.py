import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

import attnsurgery as surg
from attnsurgery.families import detect_family
from attnsurgery.inventory import describe
from attnsurgery.processors.base import WrappingProcessor
from attnsurgery.processors.sdpa_intercept import FirstAttentionCall
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


# --------------------------------------------------------------------------------------------- newer DiTs
NEW_DITS = [
    # builder, family, joint order, native px, layer kinds in model order
    (tiny.tiny_flux2, "flux2", "text_image", 1024, ["joint", "joint", "single", "single"]),
    (tiny.tiny_qwenimage, "qwenimage", "text_image", 1328, ["joint", "joint"]),
    (tiny.tiny_zimage, "zimage", "image_text", 1024, ["self", "self", "text", "text", "single", "single"]),
    (tiny.tiny_chroma, "chroma", "text_image", 1024, ["joint", "joint", "single", "single"]),
]


@pytest.mark.parametrize("builder, name, order, native, kinds", NEW_DITS, ids=[row[1] for row in NEW_DITS])
def test_newer_dit_families(builder, name, order, native, kinds):
    pipe = builder()
    info = describe(pipe.transformer, pipe.vae_scale_factor)
    assert (info.family.name, info.family.kind, info.family.joint_order) == (name, "mmdit", order)
    assert (info.family.native_resolution, info.family.vae_scale_factor, info.family.patch_size) == (native, 8, 2)
    assert [layer.kind for layer in info.layers] == kinds
    assert [layer.block_index for layer in info.layers] == list(range(len(kinds)))  # blocks in forward order
    assert all(layer.heads == 4 and layer.head_dim == 16 for layer in info.layers)


@pytest.mark.parametrize(
    "received, family, expected",
    [(981.0, "sd3", 981.0), (0.981, "flux", 981.0), (0.25, "qwenimage", 250.0), (0.25, "zimage", 750.0)],
)
def test_scheduler_timestep_undoes_what_the_pipeline_passes(received, family, expected):
    builders = {
        "sd3": tiny.tiny_sd3,
        "flux": tiny.tiny_flux,
        "qwenimage": tiny.tiny_qwenimage,
        "zimage": tiny.tiny_zimage,
    }
    pipe = builders[family]()
    assert detect_family(pipe.transformer).scheduler_timestep(received) == pytest.approx(expected)


# ------------------------------------------------------------------------------ where the text tokens sit
SIZE = 96  # 12 x 12 latent cells, 6 x 6 = 36 image tokens: not a multiple of 32, so Z-Image pads its image stream
PLACEMENT_RUNS = {
    "sd3": (tiny.tiny_sd3, dict(max_sequence_length=8, guidance_scale=1.0)),
    "sd35": (tiny.tiny_sd35, dict(max_sequence_length=8, guidance_scale=1.0)),
    "flux": (tiny.tiny_flux, dict(max_sequence_length=8)),
    "flux2": (tiny.tiny_flux2, dict(max_sequence_length=16)),
    "qwenimage": (tiny.tiny_qwenimage, dict(max_sequence_length=16, true_cfg_scale=1.0)),
    "zimage": (tiny.tiny_zimage, dict(max_sequence_length=32, guidance_scale=0.0)),
    "chroma": (tiny.tiny_chroma, dict(max_sequence_length=8, guidance_scale=1.0)),
}


class _RecordValues(WrappingProcessor):
    """Keeps the values of the layer's SDPA call, [tokens, heads * dim] of batch row 0."""

    def __init__(self, inner, values: list) -> None:
        super().__init__(inner)
        self.values = values

    def __call__(self, attn, hidden_states, *args, **kwargs):
        def keep(q, k, v, out, call):
            self.values.append(v[0].transpose(0, 1).flatten(1))
            return out

        with FirstAttentionCall(keep):
            return self.inner(attn, hidden_states, *args, **kwargs)


def _pad32(n: int) -> int:
    return n + (-n) % 32


def _distinct_rows(rows: torch.Tensor) -> int:
    """How many different rows (up to float noise) a [tokens, channels] table holds."""
    distances = torch.cdist(rows.double(), rows.double())
    seen = torch.zeros(len(rows), dtype=torch.bool)
    count = 0
    for i in range(len(rows)):
        if not seen[i]:
            seen |= distances[i] < 1e-6
            count += 1
    return count


def _text_length(args, kwargs) -> int:
    if "encoder_hidden_states" in kwargs:
        return kwargs["encoder_hidden_states"].shape[1]
    return args[2][0].shape[0]  # Z-Image: transformer(x_list, t, cap_feats_list)


def _record(pipe, info, blank_text_at: str | None = None):
    """One denoiser call: {layer path: SDPA values}, image-stream values of joint layers, the text length.
    `blank_text_at` names the block whose text output is replaced by zeros (what enters the later layers)."""
    values = {layer.path: [] for layer in info.layers}
    streams = {layer.path: [] for layer in info.layers if layer.kind == "joint"}
    lengths = []
    surgery = surg.apply(pipe)
    try:
        for layer in info.layers:
            surgery.set_processor(layer, _RecordValues(layer.module.processor, values[layer.path]), role="tokens")
            if layer.path in streams:
                hook = lambda m, a, out, kept=streams[layer.path]: kept.append(out[0])  # noqa: E731
                surgery.add_hook(layer.module.to_v, hook, pre=False)
        count = lambda m, args, kwargs: lengths.append(_text_length(args, kwargs))  # noqa: E731
        surgery.add_hook(pipe.transformer, count, pre=True, with_kwargs=True)
        if blank_text_at is not None:
            surgery.add_hook(pipe.transformer.get_submodule(blank_text_at), _blank_text(lengths), pre=False)
        kwargs = PLACEMENT_RUNS[info.family.name][1]
        pipe(prompt="a red cube", num_inference_steps=1, height=SIZE, width=SIZE, output_type="latent", **kwargs)
    finally:
        surgery.remove()
    return {path: v[0] for path, v in values.items()}, {path: v[0] for path, v in streams.items()}, lengths[0]


def _blank_text(lengths: list):
    """A forward hook zeroing a block's text output: a Z-Image context_refiner block returns the caption
    stream alone; a FLUX-like double block returns (text, image) streams, the text one has the text length."""

    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            return torch.zeros_like(output)
        return tuple(torch.zeros_like(t) if t.shape[1] == lengths[-1] else t for t in output)

    return hook


@pytest.mark.parametrize("name", list(PLACEMENT_RUNS))
def test_image_tokens_sit_where_each_layer_declares(name):
    """Counts: every SDPA sequence holds exactly the image tokens plus the text (Z-Image: each stream padded
    to a multiple of 32). Joint layers: the image stream's own values sit at the declared image range.
    Image-only layers: any pads come after the image tokens."""
    pipe = PLACEMENT_RUNS[name][0]()
    pipe.set_progress_bar_config(disable=True)
    info = describe(pipe.transformer, pipe.vae_scale_factor)
    values, streams, text = _record(pipe, info)
    image = (SIZE // 8 // 2) ** 2
    pad = _pad32 if name == "zimage" else (lambda n: n)
    for layer in info.layers:
        v = values[layer.path]
        expected = {"self": pad(image), "text": pad(text)}.get(layer.kind, pad(image) + pad(text))
        assert v.shape[0] == expected, layer.path
        if layer.kind == "text":
            assert layer.text_placement is None
            continue
        first = layer.text_placement == "first"
        span = slice(v.shape[0] - image, None) if first else slice(0, image)
        if layer.kind == "joint":
            torch.testing.assert_close(v[span], streams[layer.path], rtol=0, atol=0)
        if layer.kind == "self":
            assert layer.text_placement == "last" and _distinct_rows(v[image:]) <= 1, layer.path


SINGLE_STREAM_ENTRY = {
    "flux": "transformer_blocks.1",
    "flux2": "transformer_blocks.1",
    "chroma": "transformer_blocks.1",
}
SINGLE_STREAM_ENTRY["zimage"] = "context_refiner.1"


@pytest.mark.parametrize("name", list(SINGLE_STREAM_ENTRY))
def test_single_stream_layers_put_text_where_declared(name):
    """With the text stream zeroed where it enters the one-sequence layers, the declared non-image rows of
    their values are constant (Z-Image: two constants, its image pads and the caption), the image rows all differ."""
    pipe = PLACEMENT_RUNS[name][0]()
    pipe.set_progress_bar_config(disable=True)
    info = describe(pipe.transformer, pipe.vae_scale_factor)
    values, _, _ = _record(pipe, info, blank_text_at=SINGLE_STREAM_ENTRY[name])
    image = (SIZE // 8 // 2) ** 2
    single = [layer for layer in info.layers if layer.kind == "single"][0]
    v = values[single.path]
    first = single.text_placement == "first"
    image_rows = v[-image:] if first else v[:image]
    other_rows = v[:-image] if first else v[image:]
    assert _distinct_rows(image_rows) == image
    assert _distinct_rows(other_rows) == (2 if name == "zimage" else 1)
