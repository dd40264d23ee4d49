"""Tiny random-weight pipelines of the real architectures, built offline in well under a second.

They keep the real module trees (SD1.5's four U-Net levels with attention in the top three, SDXL's
``transformer_layers_per_block`` (1, 2, 10), SD3/SD3.5 MMDiT blocks, FLUX, FLUX.2 and Chroma double and single
blocks, Qwen-Image's dual-stream blocks, Z-Image's refiners and joint layers), so presets, selectors and peers
that key on module paths behave as on the full-size models. Tokenizers are byte-level CLIP BPE (no merges), a
small Unigram T5 and the in-process BPEs of `tiny_text`, so no file is downloaded.

Calling conventions of the newer pipelines: Flux2Pipeline's first positional argument is ``image`` (pass
``prompt=``); Qwen-Image runs CFG only with ``negative_prompt`` and ``true_cfg_scale > 1``; Chroma with
``guidance_scale > 1``; Z-Image with ``guidance_scale > 0``.

Example:
    >>> pipe = tiny_sd15()
    >>> image = pipe("a red circle", num_inference_steps=2, height=64, width=64).images[0]
"""

from __future__ import annotations

import string
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    ChromaPipeline,
    ChromaTransformer2DModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from ..reference.model import bytes_to_unicode
from .tiny_text import tiny_mistral3, tiny_mistral_tokenizer, tiny_qwen3, tiny_qwen25vl, tiny_qwen_tokenizer

__all__ = [
    "tiny_sd15",
    "tiny_sdxl",
    "tiny_sd3",
    "tiny_sd35",
    "tiny_flux",
    "tiny_flux2",
    "tiny_qwenimage",
    "tiny_zimage",
    "tiny_chroma",
    "byte_clip_tokenizer",
    "tiny_t5_tokenizer",
]

CLIP_VOCAB = 514  # 256 bytes, 256 word-final bytes, <|startoftext|>, <|endoftext|>
CLIP_BOS, CLIP_EOS = 512, 513


def byte_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over bytes with no merges: any text tokenizes, nothing is downloaded."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = CLIP_BOS
    vocab["<|endoftext|>"] = CLIP_EOS
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length: int = 512) -> T5TokenizerFast:
    """A Unigram T5 tokenizer over characters (196 pieces)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for ch in string.ascii_letters + string.digits + string.punctuation:
        pieces += [(ch, -5.0), ("▁" + ch, -4.0)]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(3, -1, -1)]
    return T5TokenizerFast(vocab=pieces, extra_ids=4, model_max_length=model_max_length)


T5_VOCAB = 196


def _clip(hidden: int = 32, projection: bool = False) -> torch.nn.Module:
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=CLIP_BOS,
        eos_token_id=CLIP_EOS,
        pad_token_id=CLIP_EOS,
        hidden_act="quick_gelu",
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5(d_model: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=T5_VOCAB,
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_decoder_layers=0,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _vae(**kwargs: Any) -> AutoencoderKL:
    """Four levels, so ``vae_scale_factor`` is 8 as in the real models."""
    return AutoencoderKL(**_VAE_SHAPE, latent_channels=4, **kwargs)


_VAE_SHAPE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)
# FLUX-like transformers: 2 double + 2 single blocks of 16-dim heads over 2x2-packed 4-channel latents.
_FLUX_BLOCKS = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16)
# The FLUX.1 VAE's latent statistics (also Chroma's and Z-Image's VAE).
_FLUX_VAE = dict(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)


def _frozen(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.eval().requires_grad_(False)


def _sd_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_sd15(seed: int = 0, in_channels: int = 4) -> StableDiffusionPipeline:
    """SD1.5's U-Net tree (CrossAttnDownBlock2D x3 + DownBlock2D, 2 layers per block, 8 heads) at widths
    (16, 32, 64, 64); ``in_channels=9`` gives the inpainting variant."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae, text_encoder = _vae(), _clip()
    _frozen(unet, vae, text_encoder)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=byte_clip_tokenizer(),
        unet=unet,
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL-base's U-Net tree (DownBlock2D + 2 CrossAttnDownBlock2D, transformer_layers_per_block (1, 2, 10),
    linear projections, text-time conditioning) at widths (16, 32, 64)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    vae, te1, te2 = _vae(), _clip(), _clip(projection=True)
    _frozen(unet, vae, te1, te2)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=byte_clip_tokenizer(),
        tokenizer_2=byte_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def _sd3_pipeline(transformer: SD3Transformer2DModel) -> StableDiffusion3Pipeline:
    vae = _vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    te1, te2, te3 = _clip(projection=True), _clip(projection=True), _t5(64)
    _frozen(transformer, vae, te1, te2, te3)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=te1,
        tokenizer=byte_clip_tokenizer(),
        text_encoder_2=te2,
        tokenizer_2=byte_clip_tokenizer(),
        text_encoder_3=te3,
        tokenizer_3=tiny_t5_tokenizer(),
    )


def _sd3_transformer(num_layers: int, **kwargs: Any) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=32,
        **kwargs,
    )


def tiny_sd3(seed: int = 0, num_layers: int = 12) -> StableDiffusion3Pipeline:
    """SD3-medium's MMDiT layout (joint blocks, last one context-pre-only) with 4 heads x 8 dims; 12 blocks
    by default so that ``transformer_blocks.1`` and ``transformer_blocks.10`` both exist."""
    torch.manual_seed(seed)
    return _sd3_pipeline(_sd3_transformer(num_layers))


def tiny_sd35(seed: int = 0, num_layers: int = 4) -> StableDiffusion3Pipeline:
    """SD3.5's additions: RMS qk_norm and dual attention (an image-only ``attn2``) in the first blocks."""
    torch.manual_seed(seed)
    return _sd3_pipeline(_sd3_transformer(num_layers, qk_norm="rms_norm", dual_attention_layers=(0, 1)))


def tiny_flux(seed: int = 0, guidance_embeds: bool = False) -> FluxPipeline:
    """FLUX's layout: 2 double-stream + 2 single-stream blocks, 2 heads x 16 dims, RoPE axes (4, 4, 8)."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        **_FLUX_BLOCKS,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
        guidance_embeds=guidance_embeds,
    )
    vae = _vae(**_FLUX_VAE)
    te1, te2 = _clip(), _t5(32)
    _frozen(transformer, vae, te1, te2)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=te1,
        tokenizer=byte_clip_tokenizer(),
        text_encoder_2=te2,
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=transformer,
    )


def _assemble(pipeline_class: type, transformer, vae, text_encoder, tokenizer, shift: float = 1.0) -> Any:
    """The newer pipelines' common shape: one text encoder with its tokenizer, a VAE, a flow-matching scheduler."""
    _frozen(transformer, vae, text_encoder)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    return pipeline_class(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def tiny_flux2(seed: int = 0) -> Flux2Pipeline:
    """FLUX.2's layout: 2 double-stream blocks (Flux2Attention) + 2 single-stream blocks (Flux2ParallelSelfAttention,
    fused QKV+MLP projection), 4 heads x 16 dims, 4-axis RoPE over (T, H, W, L) ids, guidance embedding; a
    30-layer Mistral3 encoder whose hidden states 10, 20, 30 are stacked (3 x 32 = joint_attention_dim). The
    AutoencoderKLFlux2 has four levels (factor 8) and its 2x2 patchified latents give 4 x 4 = 16 channels.
    The text is padded to ``max_sequence_length`` and not masked, as in the real pipeline: keep it short."""
    torch.manual_seed(seed)
    tokenizer = tiny_mistral_tokenizer()
    transformer = Flux2Transformer2DModel(
        **_FLUX_BLOCKS,
        num_attention_heads=4,
        joint_attention_dim=3 * 32,
        timestep_guidance_channels=32,
        mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=True,
    )
    vae = AutoencoderKLFlux2(**{**_VAE_SHAPE, "norm_num_groups": 8}, latent_channels=4, patch_size=(2, 2))
    text_encoder = tiny_mistral3(tokenizer)
    return _assemble(Flux2Pipeline, transformer, vae, text_encoder, tokenizer)


def tiny_qwenimage(seed: int = 0) -> QwenImagePipeline:
    """Qwen-Image's layout: 2 dual-stream blocks (QwenDoubleStreamAttnProcessor2_0, [text, image]), 4 heads x 16
    dims, RoPE axes (4, 6, 6), qk RMSNorm; a Qwen2.5-VL encoder (its last hidden state, template prefix dropped,
    not padded: cond and uncond prompts reach the transformer with different lengths) and the causal-3D
    AutoencoderKLQwenImage with three spatial downsamplings (factor 8)."""
    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    z_dim = 4
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, False, False],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    text_encoder = tiny_qwen25vl(tokenizer)
    return _assemble(QwenImagePipeline, transformer, vae, text_encoder, tokenizer)


def tiny_zimage(seed: int = 0) -> ZImagePipeline:
    """Z-Image's layout: 2 ``noise_refiner`` blocks (image tokens only), 2 ``context_refiner`` blocks (caption
    tokens only), 2 main ``layers`` over [image, caption]; each stream padded to a multiple of 32 tokens with a
    learned, unmasked pad token; 4 heads x 16 dims, qk RMSNorm. A Qwen3 encoder (hidden 32 = cap_feat_dim) and a
    FLUX-style 16-channel VAE (factor 8)."""
    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=64,
        n_layers=2,
        n_refiner_layers=2,
        n_heads=4,
        n_kv_heads=4,
        qk_norm=True,
        cap_feat_dim=32,
        rope_theta=256.0,
        axes_dims=[4, 6, 6],
        axes_lens=[1024, 512, 512],
    )
    vae = AutoencoderKL(**_VAE_SHAPE, latent_channels=16, **_FLUX_VAE)
    text_encoder = tiny_qwen3(tokenizer)
    return _assemble(ZImagePipeline, transformer, vae, text_encoder, tokenizer, shift=3.0)


def tiny_chroma(seed: int = 0) -> ChromaPipeline:
    """Chroma's layout: FLUX-like 2 double + 2 single blocks, 4 heads x 16 dims, RoPE axes (4, 6, 6), modulation
    from the ``distilled_guidance_layer`` approximator; T5 only, its padding masked (one pad token kept), so an
    attention mask reaches every layer."""
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        **_FLUX_BLOCKS,
        num_attention_heads=4,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
        approximator_num_channels=64,
        approximator_hidden_dim=32,
        approximator_layers=2,
    )
    return _assemble(ChromaPipeline, transformer, _vae(**_FLUX_VAE), _t5(32), tiny_t5_tokenizer())
