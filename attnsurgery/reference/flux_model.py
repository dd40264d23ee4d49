"""The reference DiT: a real, small FluxPipeline (FLUX.1 topology) in the reference world's image space.

Every component is the real diffusers/transformers class, so every FLUX default of every plugin applies:
FluxTransformer2DModel (double-stream joint blocks, then single-stream blocks, RoPE over (text, row,
column) ids, ``guidance_embeds=False``), sampled with FlowMatchEulerDiscreteScheduler and true CFG
(``true_cfg_scale`` with a negative prompt). The VAE is the U-Net reference's (factor 4, 4 channels), so
both references share one image space; FLUX's 2 x 2 packing makes the native 64 px image an 8 x 8 token
grid (64 image tokens), 2x a 16 x 16 grid and 4x a 32 x 32 grid. Text: the reference CLIP text encoder
(pooled output) and a small T5 encoder read through a word-level tokenizer built from the captions' grammar.

The only changes to FluxPipeline are defaults (``ReferenceFluxPipeline``): prompts are padded to
``TEXT_TOKENS`` (the length the model is trained with) rather than 512, since FLUX attends over every pad
token, and ``guidance_scale`` means true CFG against an empty negative prompt.

Example:
    >>> pipe = load_reference_flux_pipeline()  # doctest: +SKIP
    >>> pipe("a red circle", num_inference_steps=20).images[0]  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

from attnsurgery.reference.model import (
    CONFIG_FILE,
    WEIGHTS_DIR,
    load_components,
    reference_configs,
    reference_tokenizer,
    save_components,
)
from attnsurgery.reference.shapes import PALETTE, SHAPES

FLUX_WEIGHTS_DIR = WEIGHTS_DIR / "flux"
NATIVE_SIZE = 64
#: Text tokens per prompt (T5 pads to this); the longest caption of the grammar takes 21.
TEXT_TOKENS = 32
#: The true-CFG scale the reference DiT is used and evaluated at: on 64 held-out one-object pairs (disjoint
#: from the card's) fidelity was 0.92 at 2, 0.97 at 3, 0.95 at 4 and 5; clean shapes fall above 3.
GUIDANCE_SCALE = 3.0
#: Component name -> weights file name.
FLUX_WEIGHT_FILES = {
    "transformer": "transformer.safetensors",
    "vae": "vae.safetensors",
    "text_encoder": "text_encoder.safetensors",
    "text_encoder_2": "text_encoder_2.safetensors",
}
#: The shipped weights' T5 vocabulary is this list, in this order (a word's id is its place here), so it is
#: written out rather than derived from the grammar; tests check that every caption tokenizes without <unk>.
#: Every word the captions use ("a red circle on the left, a blue square and ..."); other words fall back
#: to letters.
GRAMMAR_WORDS = (*PALETTE, *SHAPES, "a", "an", "and", "on", "at", "the", "left", "right", "top", "bottom")


def flux_reference_configs() -> dict[str, dict[str, Any]]:
    """The component configs of the reference DiT (plain dicts, JSON-serialisable)."""
    unet_world = reference_configs()
    text_width = unet_world["text_encoder"]["hidden_size"]
    t5_width = 128
    return {
        "topology": {"name": "flux", "text_tokens": TEXT_TOKENS},
        "transformer": {
            "patch_size": 1,
            "in_channels": 16,  # 4 latent channels x 2 x 2 packing
            "num_layers": 3,
            "num_single_layers": 6,
            "attention_head_dim": 32,
            "num_attention_heads": 6,
            "joint_attention_dim": t5_width,
            "pooled_projection_dim": text_width,
            "guidance_embeds": False,
            "axes_dims_rope": [8, 12, 12],  # (text, row, column); sums to the head dim
        },
        "vae": {**unet_world["vae"], "shift_factor": 0.0},  # the latent mean, measured when training starts
        "text_encoder": unet_world["text_encoder"],
        "text_encoder_2": {
            "vocab_size": len(_t5_pieces()),
            "d_model": t5_width,
            "d_kv": 32,
            "d_ff": 4 * t5_width,
            "num_layers": 2,
            "num_heads": 4,
            "relative_attention_num_buckets": 8,
            "relative_attention_max_distance": 32,
            "feed_forward_proj": "gated-gelu",
            "dropout_rate": 0.0,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
            "eos_token_id": 1,
        },
        # FLUX's resolution-dependent shift, anchored at this model's own sequence lengths (1x and 4x).
        "scheduler": {
            "num_train_timesteps": 1000,
            "shift": 3.0,
            "use_dynamic_shifting": True,
            "base_image_seq_len": (NATIVE_SIZE // 8) ** 2,
            "max_image_seq_len": (4 * NATIVE_SIZE // 8) ** 2,
            "base_shift": 0.5,
            "max_shift": 1.15,
        },
    }


def _t5_pieces() -> list[tuple[str, float]]:
    """Unigram pieces: T5's specials, one piece per grammar word (scored to win), letters as fallback."""
    import string

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -8.0), (",", -1.0)]
    pieces += [("▁" + word, -1.0) for word in GRAMMAR_WORDS]
    pieces += [(c, -10.0) for c in string.ascii_lowercase + string.digits]
    return pieces


def reference_t5_tokenizer() -> T5TokenizerFast:
    """A word-level T5 tokenizer for the captions' grammar (unknown words spell out in letters)."""
    return T5TokenizerFast(vocab=_t5_pieces(), extra_ids=0, model_max_length=TEXT_TOKENS)


class ReferenceFluxPipeline(FluxPipeline):
    """FluxPipeline with the reference DiT's sampling defaults, so it is called like the U-Net reference.

    Prompts are padded to ``TEXT_TOKENS``, and classifier-free guidance is true CFG against an empty
    negative prompt (the model has no guidance embedding): ``guidance_scale`` (default ``GUIDANCE_SCALE``)
    becomes ``true_cfg_scale`` unless that is given. Pass these as keywords.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("max_sequence_length", TEXT_TOKENS)
        if "true_cfg_scale" not in kwargs:
            kwargs["true_cfg_scale"] = kwargs.pop("guidance_scale", GUIDANCE_SCALE)
        if kwargs["true_cfg_scale"] > 1 and len(args) < 3 and kwargs.get("negative_prompt_embeds") is None:
            kwargs.setdefault("negative_prompt", "")
        return super().__call__(*args, **kwargs)


def build_reference_flux_pipeline(configs: dict[str, dict[str, Any]] | None = None) -> ReferenceFluxPipeline:
    """The reference DiT's architecture with fresh random weights (for training and tests).

    Example:
        >>> pipe = build_reference_flux_pipeline()
        >>> len(pipe.transformer.transformer_blocks), len(pipe.transformer.single_transformer_blocks)
        (3, 6)
    """
    configs = flux_reference_configs() if configs is None else configs
    pipe = ReferenceFluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**configs["scheduler"]),
        vae=AutoencoderKL(**configs["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        tokenizer=reference_tokenizer(),
        text_encoder_2=T5EncoderModel(T5Config(**configs["text_encoder_2"])),
        tokenizer_2=reference_t5_tokenizer(),
        transformer=FluxTransformer2DModel(**configs["transformer"]),
    )
    # the native size, for detect_family (FluxTransformer2DModel takes no sample_size argument)
    pipe.transformer.register_to_config(sample_size=NATIVE_SIZE // pipe.vae_scale_factor)
    pipe.default_sample_size = NATIVE_SIZE // pipe.vae_scale_factor  # FluxPipeline's default image side / 4
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
        module.eval().requires_grad_(False)
    return pipe


def save_reference_flux_weights(pipe: FluxPipeline, out_dir: str | Path) -> None:
    """Write the pipeline's four models as fp16 safetensors plus ``config.json``."""
    configs = flux_reference_configs()
    configs["vae"]["scaling_factor"] = float(pipe.vae.config.scaling_factor)
    configs["vae"]["shift_factor"] = float(pipe.vae.config.shift_factor)
    save_components(pipe, FLUX_WEIGHT_FILES, configs, Path(out_dir))


def is_flux_reference_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds reference-DiT weights (its config names the flux topology)."""
    config = Path(folder) / CONFIG_FILE
    if not config.is_file() or not all((Path(folder) / f).is_file() for f in FLUX_WEIGHT_FILES.values()):
        return False
    return json.loads(config.read_text()).get("topology", {}).get("name") == "flux"


def load_reference_flux_pipeline(
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    weights_dir: str | Path | None = None,
) -> ReferenceFluxPipeline:
    """The trained reference DiT, loaded offline from the shipped weights or from ``weights_dir``.

    Args:
        dtype: dtype of the returned models; None keeps float32 (weights are stored in float16).
        device: where to put the pipeline; None leaves it on the CPU.
        weights_dir: a folder written by ``python -m attnsurgery.reference.train --topology flux``.
    """
    folder = FLUX_WEIGHTS_DIR if weights_dir is None else Path(weights_dir)
    if not is_flux_reference_folder(folder):
        raise FileNotFoundError(
            f"reference DiT weights not found in {folder} (it needs {CONFIG_FILE} naming the flux topology and "
            f"{', '.join(FLUX_WEIGHT_FILES.values())}). Train them with `python -m attnsurgery.reference.train "
            "--topology flux --out DIR`, then use --model DIR"
        )
    pipe = build_reference_flux_pipeline(json.loads((folder / CONFIG_FILE).read_text()))
    load_components(pipe, FLUX_WEIGHT_FILES, folder, dtype, device)
    return pipe
