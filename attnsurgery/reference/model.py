"""The reference model: a real, small StableDiffusionPipeline with the SD1.x UNet topology.

Every component is the real diffusers/transformers class, so every SD1.x default of every plugin applies
unchanged: UNet2DConditionModel with CrossAttnDownBlock2D x3 + DownBlock2D, 2 layers per block and
attention at the top level; an AutoencoderKL of factor 4 (64 px images -> 16 x 16 latents, so the native
top level holds 256 tokens and 4x holds 4096); a small CLIPTextModel read through the real CLIP BPE
tokenizer (vocabulary 49408, shipped as ``weights/bpe_simple_vocab_16e6.txt.gz``, MIT, OpenAI CLIP).

The trained weights ship in ``weights/`` as fp16 safetensors next to ``config.json`` (the component
configs they were trained with). ``python -m attnsurgery.reference.train`` reproduces them.

Example:
    >>> pipe = load_reference_pipeline()
    >>> image = pipe("a red circle", num_inference_steps=20, generator=torch.Generator().manual_seed(0)).images[0]
    >>> image.size
    (64, 64)
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

WEIGHTS_DIR = Path(__file__).parent / "weights"
NATIVE_SIZE = 64
#: The guidance scale the reference weights are used and evaluated at. SD's 7.5 is too strong for a model
#: this small: on 200 held-out one-object pairs (20 steps) fidelity falls as guidance rises above ~2.
GUIDANCE_SCALE = 2.0
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
CONFIG_FILE = "config.json"
#: Component name -> weights file name inside ``weights/``.
WEIGHT_FILES = {
    "unet": "unet.safetensors",
    "vae": "vae.safetensors",
    "text_encoder": "text_encoder.safetensors",
}

_CLIP_BOS, _CLIP_EOS = 49406, 49407


def reference_configs() -> dict[str, dict[str, Any]]:
    """The component configs of the reference model (plain dicts, JSON-serialisable)."""
    text_width = 64
    return {
        "unet": {
            "sample_size": NATIVE_SIZE // 4,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "block_out_channels": [32, 64, 128, 128],
            "layers_per_block": 2,
            "cross_attention_dim": text_width,
            "attention_head_dim": 4,  # SD1.x semantics: the number of heads (head dims 8, 16, 32)
            "norm_num_groups": 8,  # >= 4 channels per group, as in SD (one channel per group erases colour)
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 3,  # 3 blocks -> 2 downsamples -> factor 4
            "up_block_types": ["UpDecoderBlock2D"] * 3,
            "block_out_channels": [32, 64, 64],
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 8,  # >= 4 channels per group: per-channel norms make flat colours drift
            "sample_size": NATIVE_SIZE,
            "scaling_factor": 1.0,  # replaced by 1 / std(latents) after the VAE is trained
        },
        "text_encoder": {
            "vocab_size": 49408,
            "hidden_size": text_width,
            "intermediate_size": 4 * text_width,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "projection_dim": text_width,
            "bos_token_id": _CLIP_BOS,
            "eos_token_id": _CLIP_EOS,
            "pad_token_id": _CLIP_EOS,
            "hidden_act": "quick_gelu",
        },
        # SD1.x's scheduler settings.
        "scheduler": {
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
            "prediction_type": "epsilon",
        },
    }


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's byte-level BPE vocabulary, rebuilt from the merges file as OpenAI's tokenizer does."""
    path = WEIGHTS_DIR / VOCAB_FILE
    if not path.is_file():
        raise RuntimeError(f"The CLIP vocabulary {path} is missing; reinstall attnsurgery to restore it.")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP table mapping every byte to a printable unicode character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def reference_tokenizer() -> CLIPTokenizer:
    """The real CLIP tokenizer (49408 tokens, 77 positions), built offline from the shipped vocabulary."""
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)


def build_reference_pipeline(configs: dict[str, dict[str, Any]] | None = None) -> StableDiffusionPipeline:
    """The reference pipeline's architecture with fresh random weights (for training and tests).

    Args:
        configs: component configs as returned by ``reference_configs()``; None uses those.

    Example:
        >>> pipe = build_reference_pipeline()
        >>> pipe.unet.config.block_out_channels
        [32, 64, 128, 128]
    """
    configs = reference_configs() if configs is None else configs
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**configs["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        tokenizer=reference_tokenizer(),
        unet=UNet2DConditionModel(**configs["unet"]),
        scheduler=DDIMScheduler(**configs["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.eval().requires_grad_(False)
    return pipe


def save_components(pipe: Any, files: dict[str, str], configs: dict[str, Any], out: Path) -> None:
    """Write ``pipe``'s components named in ``files`` as fp16 safetensors, and ``configs`` as ``config.json``."""
    out.mkdir(parents=True, exist_ok=True)
    for name, file in files.items():
        state = getattr(pipe, name).state_dict()
        half = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in state.items()}
        save_file(half, str(out / file))
    (out / CONFIG_FILE).write_text(json.dumps(configs, indent=2) + "\n")


def load_components(
    pipe: Any, files: dict[str, str], folder: Path, dtype: torch.dtype | None, device: str | torch.device | None
) -> None:
    """Load ``pipe``'s components from the fp16 files ``save_components`` wrote; float32 unless ``dtype``."""
    for name, file in files.items():
        getattr(pipe, name).load_state_dict(load_file(str(folder / file)), strict=True)
    pipe.to(device=device, dtype=dtype or torch.float32)
    pipe.set_progress_bar_config(disable=None)


def save_reference_weights(pipe: StableDiffusionPipeline, out_dir: str | Path) -> None:
    """Write the pipeline's UNet, VAE and text encoder as fp16 safetensors plus ``config.json``."""
    configs = reference_configs()
    configs["vae"]["scaling_factor"] = float(pipe.vae.config.scaling_factor)
    configs["scheduler"]["prediction_type"] = pipe.scheduler.config.prediction_type
    save_components(pipe, WEIGHT_FILES, configs, Path(out_dir))


def has_reference_weights(weights_dir: str | Path | None = None) -> bool:
    """Whether trained weights are present (shipped in the package, or in ``weights_dir``)."""
    folder = WEIGHTS_DIR if weights_dir is None else Path(weights_dir)
    return all((folder / f).is_file() for f in [CONFIG_FILE, *WEIGHT_FILES.values()])


def load_reference_pipeline(
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    weights_dir: str | Path | None = None,
) -> StableDiffusionPipeline:
    """The trained reference StableDiffusionPipeline, loaded fully offline from the shipped weights.

    Args:
        dtype: dtype of the returned models; None keeps float32 (weights are stored in float16).
        device: where to put the pipeline; None leaves it on the CPU.
        weights_dir: a folder written by ``python -m attnsurgery.reference.train``; None uses the
            weights shipped inside the package.

    Example:
        >>> pipe = load_reference_pipeline()
        >>> image = pipe("a blue triangle", num_inference_steps=20).images[0]
    """
    folder = WEIGHTS_DIR if weights_dir is None else Path(weights_dir)
    if not has_reference_weights(folder):
        missing = [f for f in [CONFIG_FILE, *WEIGHT_FILES.values()] if not (folder / f).is_file()]
        raise FileNotFoundError(
            f"reference weights not found in {folder} (missing: {', '.join(missing)}). Reinstall attnsurgery "
            "for the shipped ones, or train them with `python -m attnsurgery.reference.train --out DIR`, "
            "then use --model DIR (or load_reference_pipeline(weights_dir=DIR))"
        )
    pipe = build_reference_pipeline(json.loads((folder / CONFIG_FILE).read_text()))
    # Training uses DDIM's noise maths; sampling uses DPM-Solver++ (2M): +0.06 fidelity over DDIM at 20 steps.
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    load_components(pipe, WEIGHT_FILES, folder, dtype, device)
    return pipe
