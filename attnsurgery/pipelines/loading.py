"""Finding a denoiser's architecture from a local diffusers folder or a hub id, without its weights.

``inspect`` needs only the architecture, so the denoiser is built on the ``meta`` device from its config:
a 12B-parameter FLUX is described in a second and no weight file is read.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DenoiserSpec",
    "read_denoiser_spec",
    "meta_module",
    "meta_denoiser",
    "load_pipeline",
    "parse_dtype",
    "read_json",
    "single_file_pipeline_class",
    "default_guidance_scale",
]

DENOISER_CLASSES = (
    "UNet2DConditionModel",
    "SD3Transformer2DModel",
    "FluxTransformer2DModel",
    "Flux2Transformer2DModel",
    "QwenImageTransformer2DModel",
    "ZImageTransformer2DModel",
    "ChromaTransformer2DModel",
)
DENOISER_SUBFOLDERS = ("unet", "transformer")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class DenoiserSpec:
    """A denoiser's class name, config and the pipeline's VAE scale factor (pixels per latent cell)."""

    class_name: str
    config: dict[str, Any]
    vae_scale_factor: int


def read_json(path: Path) -> dict[str, Any]:
    """A JSON config file; invalid JSON is a ValueError naming the file."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None


def _vae_factor(folder: Path) -> int:
    vae_config = folder / "vae" / "config.json"
    if not vae_config.is_file():
        return 8
    blocks = read_json(vae_config).get("block_out_channels") or [0] * 4
    return 2 ** (len(blocks) - 1)


def _spec_from_folder(folder: Path) -> DenoiserSpec:
    if (folder / "model_index.json").is_file():
        for sub in DENOISER_SUBFOLDERS:
            config_path = folder / sub / "config.json"
            if config_path.is_file():
                config = read_json(config_path)
                return DenoiserSpec(config.get("_class_name", ""), config, _vae_factor(folder))
        raise ValueError(f"{folder} is a diffusers pipeline folder without a unet/ or transformer/ config")
    if (folder / "config.json").is_file():
        config = read_json(folder / "config.json")
        return DenoiserSpec(config.get("_class_name", ""), config, _vae_factor(folder.parent))
    raise ValueError(f"{folder} has neither model_index.json (a pipeline) nor config.json (a denoiser)")


def _download_config(repo_id: str) -> Path:
    """Fetch only the JSON files of a hub repo; offline, say how to use a local folder instead."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["model_index.json", "*/config.json", "config.json"]))
    except Exception as error:  # offline, unknown repo, gated repo: all end the same way for the user
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder and the hub could not be reached ({reason}); "
            "download the model elsewhere and pass its local diffusers folder"
        ) from None


def read_denoiser_spec(model: str | os.PathLike[str]) -> DenoiserSpec:
    """The denoiser of a local diffusers folder (pipeline or bare denoiser) or hub id.

    Raises:
        FileNotFoundError: a path that does not exist, or a hub id that cannot be reached.
        ValueError: a folder that holds no supported denoiser config.
    """
    reference = _reference_spec(model)
    if reference is not None:
        return reference
    path = Path(model).expanduser()
    if path.is_file():
        raise ValueError(f"{path} is a single file; inspect takes a diffusers folder (pipeline or unet/transformer)")
    if path.is_dir():
        spec = _spec_from_folder(path)
    elif not HUB_ID.fullmatch(str(model)):
        raise FileNotFoundError(f"no such folder: {path}")
    else:
        spec = _spec_from_folder(_download_config(str(model)))
    if spec.class_name not in DENOISER_CLASSES:
        raise ValueError(
            f"{model}: unsupported denoiser class {spec.class_name or '(none)'!r}; "
            f"supported: {', '.join(DENOISER_CLASSES)}"
        )
    return spec


#: The reference models shipped in the package, by name, and their trainer topology.
REFERENCE_MODELS = {"reference": "unet", "reference-flux": "flux"}


def reference_topology(model: str | os.PathLike[str]) -> str | None:
    """``"unet"`` or ``"flux"`` for a shipped reference model's name or a folder the reference trainer wrote
    (either topology); None for anything else."""
    from ..reference.flux_model import is_flux_reference_folder
    from ..reference.model import has_reference_weights

    if str(model) in REFERENCE_MODELS:
        return REFERENCE_MODELS[str(model)]
    path = Path(model).expanduser()
    if path.is_dir() and has_reference_weights(path):
        return "unet"
    if path.is_dir() and is_flux_reference_folder(path):
        return "flux"
    return None


def _reference_spec(model: str | os.PathLike[str]) -> DenoiserSpec | None:
    """The denoiser of a shipped reference model (by name: its architecture is in the code) or of a folder
    the reference trainer wrote (its ``config.json`` holds every component's config); None otherwise."""
    from ..reference.flux_model import flux_reference_configs
    from ..reference.model import reference_configs

    topology = reference_topology(model)
    if topology is None:
        return None
    if str(model) in REFERENCE_MODELS:
        configs = reference_configs() if topology == "unet" else flux_reference_configs()
    else:
        configs = read_json(Path(model).expanduser() / "config.json")
    factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    if topology == "unet":
        return DenoiserSpec("UNet2DConditionModel", configs["unet"], factor)
    native = {"sample_size": configs["vae"]["sample_size"] // factor}  # as build_reference_flux_pipeline records
    return DenoiserSpec("FluxTransformer2DModel", {**configs["transformer"], **native}, factor)


def meta_module(class_name: str, config: dict[str, Any]) -> torch.nn.Module:
    """Build a diffusers model class from its config on the meta device: the module tree, no weight memory."""
    import diffusers

    cls = getattr(diffusers, class_name)
    accepted = inspect.signature(cls.__init__).parameters
    known = {k: v for k, v in config.items() if k in accepted}
    with torch.device("meta"):
        module = cls.from_config(known)
    # keys the class does not take (a FLUX config's recorded sample_size) stay readable in its config
    module.register_to_config(**{k: v for k, v in config.items() if k not in accepted and not k.startswith("_")})
    return module


def meta_denoiser(spec: DenoiserSpec) -> torch.nn.Module:
    """Build the denoiser on the meta device: the full module tree, no memory for weights."""
    return meta_module(spec.class_name, spec.config)


# --------------------------------------------------------------------------------------------------
# Whole pipelines: the reference model, local folders, hub ids and single-file checkpoints
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
_SINGLE_FILE_PIPELINES = {  # diffusers' single-file model types -> the pipeline class that loads them
    "v1": "StableDiffusionPipeline",
    "v2": "StableDiffusionPipeline",
    "inpainting": "StableDiffusionInpaintPipeline",
    "inpainting_v2": "StableDiffusionInpaintPipeline",
    "xl_base": "StableDiffusionXLPipeline",
    "playground-v2-5": "StableDiffusionXLPipeline",
    "xl_inpaint": "StableDiffusionXLInpaintPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "sd35_medium": "StableDiffusion3Pipeline",
    "sd35_large": "StableDiffusion3Pipeline",
    "flux-dev": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
    "flux-fill": "FluxFillPipeline",
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``, ``"fp16"``, ``"fp32"`` (or the long names, or a torch dtype) as a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


@contextlib.contextmanager
def _fetch_failure(what: str, fix: str) -> Iterator[None]:
    """Turn a failed download (offline, unknown repo) into one FileNotFoundError that says what to do."""
    try:
        yield
    except OSError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FileNotFoundError(f"{what} ({reason}); {fix}") from None


def _dtype_kwargs(dtype: torch.dtype | None) -> dict[str, Any]:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (0.42 warns on the old name); pass what it expects."""
    if dtype is None:
        return {}
    import diffusers
    from packaging.version import Version

    renamed = Version(diffusers.__version__).release >= (0, 42)
    return {"dtype" if renamed else "torch_dtype": dtype}


def single_file_pipeline_class(checkpoint: dict[str, Any]) -> str:
    """The diffusers pipeline class that loads a single-file checkpoint, from its state-dict keys."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    model_type = infer_diffusers_model_type(checkpoint)
    if model_type not in _SINGLE_FILE_PIPELINES:
        raise NotImplementedError(
            f"single-file checkpoint of type {model_type!r} is not supported; supported: "
            f"{', '.join(sorted(_SINGLE_FILE_PIPELINES))}"
        )
    return _SINGLE_FILE_PIPELINES[model_type]


def _load_single_file(path: Path, dtype: torch.dtype | None, config: str | os.PathLike[str] | None):
    import diffusers
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    class_name = single_file_pipeline_class(load_single_file_checkpoint(str(path)))
    kwargs = _dtype_kwargs(dtype)
    if config is not None:
        kwargs["config"] = str(config)
    with _fetch_failure(
        f"{path.name}: loading a single file needs the model's configs, which could not be fetched",
        "pass config=<local diffusers folder of the same architecture>",
    ):
        return getattr(diffusers, class_name).from_single_file(str(path), **kwargs)


#: Classifier-free guidance for models that recommend none (diffusers' Stable Diffusion default).
DEFAULT_GUIDANCE_SCALE = 7.5


def default_guidance_scale(model: str | os.PathLike[str]) -> float:
    """The guidance scale to use when none is given: the reference models' own, 7.5 for every other model.

    Example:
        >>> default_guidance_scale("stabilityai/stable-diffusion-2-1")
        7.5
    """
    from ..reference.flux_model import GUIDANCE_SCALE as FLUX_GUIDANCE_SCALE
    from ..reference.model import GUIDANCE_SCALE

    scales = {"unet": GUIDANCE_SCALE, "flux": FLUX_GUIDANCE_SCALE}
    return scales.get(reference_topology(model) or "", DEFAULT_GUIDANCE_SCALE)


def load_pipeline(
    model: str | os.PathLike[str] = "reference",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    config: str | os.PathLike[str] | None = None,
):
    """Load a diffusers pipeline from the shipped reference model, a folder, a hub id or a single file.

    Args:
        model: ``"reference"`` or ``"reference-flux"`` (the small U-Net and DiT shipped in the package,
            offline), a folder written by ``python -m attnsurgery.reference.train`` (either topology), a
            local diffusers folder, a hub id, or a ``.safetensors``/``.ckpt`` single-file checkpoint.
        dtype: ``torch.float16``, ``"bf16"``, ... (default: as stored).
        device: where to move the pipeline (default: stay on the CPU).
        config: for single files, a local diffusers folder holding the configs (needed offline).

    Raises:
        FileNotFoundError: a missing path, or a hub id / config that cannot be fetched (offline).

    Example:
        >>> pipe = load_pipeline("reference")
        >>> image = pipe("a red circle", num_inference_steps=20).images[0]
    """
    from diffusers import DiffusionPipeline

    from ..reference.flux_model import load_reference_flux_pipeline
    from ..reference.model import load_reference_pipeline

    torch_dtype = parse_dtype(dtype)
    path = Path(model).expanduser()
    topology = reference_topology(model)
    weights_dir = None if str(model) in REFERENCE_MODELS else path  # None: the weights in the package
    if topology == "unet":
        pipe = load_reference_pipeline(dtype=torch_dtype, weights_dir=weights_dir)
    elif topology == "flux":
        pipe = load_reference_flux_pipeline(dtype=torch_dtype, weights_dir=weights_dir)
    elif path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise ValueError(f"{path} is not a checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}) nor a folder")
        pipe = _load_single_file(path, torch_dtype, config)
    elif path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        pipe = DiffusionPipeline.from_pretrained(path, **_dtype_kwargs(torch_dtype))
    elif HUB_ID.fullmatch(str(model)):
        hint = "download it elsewhere and pass the local folder"
        with _fetch_failure(f"{model!r} could not be loaded from the hub", hint):
            pipe = DiffusionPipeline.from_pretrained(str(model), **_dtype_kwargs(torch_dtype))
    else:
        raise FileNotFoundError(f"no such file or folder: {path}")
    return pipe.to(device) if device is not None else pipe
