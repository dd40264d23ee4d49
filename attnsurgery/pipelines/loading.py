"""Finding a denoiser's architecture from a local diffusers folder or a hub id, without its weights.

``inspect`` needs only the architecture, so the denoiser is built on the ``meta`` device from its config:
a 12B-parameter FLUX is described in a second and no weight file is read.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["DenoiserSpec", "read_denoiser_spec", "meta_denoiser"]

DENOISER_CLASSES = ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel")
DENOISER_SUBFOLDERS = ("unet", "transformer")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class DenoiserSpec:
    """A denoiser's class name, config and the pipeline's VAE scale factor (pixels per latent cell)."""

    class_name: str
    config: dict[str, Any]
    vae_scale_factor: int


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None


def _vae_factor(folder: Path) -> int:
    vae_config = folder / "vae" / "config.json"
    if not vae_config.is_file():
        return 8
    blocks = _read_json(vae_config).get("block_out_channels") or [0] * 4
    return 2 ** (len(blocks) - 1)


def _spec_from_folder(folder: Path) -> DenoiserSpec:
    if (folder / "model_index.json").is_file():
        for sub in DENOISER_SUBFOLDERS:
            config_path = folder / sub / "config.json"
            if config_path.is_file():
                config = _read_json(config_path)
                return DenoiserSpec(config.get("_class_name", ""), config, _vae_factor(folder))
        raise ValueError(f"{folder} is a diffusers pipeline folder without a unet/ or transformer/ config")
    if (folder / "config.json").is_file():
        config = _read_json(folder / "config.json")
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


def meta_denoiser(spec: DenoiserSpec) -> torch.nn.Module:
    """Build the denoiser on the meta device: the full module tree, no memory for weights."""
    import diffusers

    cls = getattr(diffusers, spec.class_name)
    config = {k: v for k, v in spec.config.items() if not k.startswith("_")}
    with torch.device("meta"):
        return cls.from_config(config)
