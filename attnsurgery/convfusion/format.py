"""ConvFusion files: replacement weights as safetensors + a JSON config, validated against the architecture.

A saved ConvFusion is two files in one folder:

- ``convfusion.safetensors``: only the conv blocks' weights, keyed ``<attn1 module path>.<parameter>``;
- ``convfusion.json``: the format tag, one entry per block (module path, channels, kernel size, scales,
  gate) and the base model's *architecture fingerprint* (its denoiser class and structural config), so
  blocks distilled for one architecture are refused on another, whatever the model is called.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from attnsurgery.ops.pyramid_conv import PyramidConvBlock

FORMAT = "attnsurgery-convfusion/1"
WEIGHTS_NAME = "convfusion.safetensors"
CONFIG_NAME = "convfusion.json"

# Config keys that fix the denoiser's module tree and tensor shapes; sample size, scheduler-facing and
# training-only keys are left out so the same architecture at another resolution still matches.
_STRUCTURAL_KEYS = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "down_block_types",
    "mid_block_type",
    "up_block_types",
    "layers_per_block",
    "transformer_layers_per_block",
    "cross_attention_dim",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "only_cross_attention",
    "addition_embed_type",
    "projection_class_embeddings_input_dim",
    "class_embed_type",
    "encoder_hid_dim_type",
    "norm_num_groups",
)


def _plain(value: Any) -> Any:
    """JSON-comparable form of a config value (tuples become lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def architecture_fingerprint(denoiser: torch.nn.Module) -> dict[str, Any]:
    """The denoiser's class name and structural config values, as plain JSON data.

    Args:
        denoiser: a diffusers model with a ``config`` (e.g. ``pipe.unet``).

    Example:
        >>> architecture_fingerprint(pipe.unet)["block_out_channels"]  # doctest: +SKIP
        [320, 640, 1280, 1280]
    """
    config = getattr(denoiser, "config", {})
    fingerprint: dict[str, Any] = {"class": type(denoiser).__name__}
    for key in _STRUCTURAL_KEYS:
        if key in config:
            fingerprint[key] = _plain(config[key])
    return fingerprint


def check_fingerprint(saved: Mapping[str, Any], current: Mapping[str, Any], source: str) -> None:
    """Raise a ValueError naming every difference between two ``architecture_fingerprint`` results."""
    differences = [
        f"{key}: saved {saved.get(key)!r}, model {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if differences:
        raise ValueError(
            f"{source} was made for another architecture than this model ({'; '.join(differences)}). "
            "Load blocks distilled for this architecture, or distil new ones with `attnsurgery distill`."
        )


def block_spec(block: PyramidConvBlock) -> dict[str, Any]:
    """The constructor arguments that rebuild ``block`` (weights aside)."""
    return {
        "channels": block.channels,
        "kernel_size": block.kernel_size,
        "scales": list(block.scales),
        "gate": block.gate,
    }


def save_blocks(folder: str | Path, blocks: Mapping[str, PyramidConvBlock], fingerprint: Mapping[str, Any]) -> Path:
    """Write ``blocks`` (attn1 module path -> block) and the fingerprint into ``folder``.

    Args:
        folder: output folder (created).
        blocks: the replacement blocks by the path of the attention module they replace.
        fingerprint: ``architecture_fingerprint`` of the base denoiser.

    Returns:
        The folder.

    Example:
        >>> save_blocks("out", plugin.blocks, architecture_fingerprint(pipe.unet))  # doctest: +SKIP
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{path}.{name}": tensor.detach().cpu().contiguous()
        for path, block in blocks.items()
        for name, tensor in block.state_dict().items()
    }
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": FORMAT})
    config = {
        "format": FORMAT,
        "fingerprint": dict(fingerprint),
        "blocks": [{"path": path, **block_spec(block)} for path, block in blocks.items()],
    }
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


_ENTRY_KEYS = ("path", "channels", "kernel_size", "scales", "gate")
_DAMAGED = "the folder is damaged; save it again (ConvFusion.save or `attnsurgery distill`)."


def _read_config(path: Path) -> dict[str, Any]:
    """The JSON config, checked for the keys ``load_blocks`` reads (so no bare KeyError names no file)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {_DAMAGED}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path} has format {found!r}, expected {FORMAT!r}.")
    for key, kind in (("fingerprint", dict), ("blocks", list)):
        if not isinstance(config.get(key), kind):
            raise ValueError(f"{path} lacks {key!r} (a JSON {'object' if kind is dict else 'list'}); {_DAMAGED}")
    for index, entry in enumerate(config["blocks"]):
        missing = [key for key in _ENTRY_KEYS if not isinstance(entry, dict) or key not in entry]
        if missing:
            label = entry.get("path", "no path") if isinstance(entry, dict) else type(entry).__name__
            raise ValueError(f"{path}: block entry {index} ({label}) lacks {missing[0]!r}; {_DAMAGED}")
    return config


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}); {_DAMAGED}") from None


def _build_block(entry: dict[str, Any], state: dict[str, torch.Tensor], weights: Path) -> PyramidConvBlock:
    """One block from its config entry and weights; any mismatch names the file and the layer."""
    path = entry["path"]
    try:
        block = PyramidConvBlock(
            entry["channels"],
            entry["kernel_size"],
            scales=entry["scales"],
            gate=entry["gate"],
            generator=torch.Generator(),
        )
        block.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as error:  # bad entry values, or tensors of other shapes
        detail = " ".join(str(error).split())  # load_state_dict's report spans lines
        raise ValueError(f"{weights} does not fit its config for {path}: {detail}; {_DAMAGED}") from None
    return block


def load_blocks(folder: str | Path) -> tuple[dict[str, PyramidConvBlock], dict[str, Any]]:
    """Read what ``save_blocks`` wrote: (path -> block with its saved weights, fingerprint).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the files are not a ConvFusion save, are damaged (unreadable, keys missing), or weights and
            config disagree; the message names the file.
    """
    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).exists():
            raise FileNotFoundError(
                f"{folder} has no {name}; a ConvFusion folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                "(as written by ConvFusion.save or `attnsurgery distill`)."
            )
    config = _read_config(folder / CONFIG_NAME)
    tensors = _read_weights(folder / WEIGHTS_NAME)
    blocks: dict[str, PyramidConvBlock] = {}
    for entry in config["blocks"]:
        path = entry["path"]
        prefix = f"{path}."
        state = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        blocks[path] = _build_block(entry, state, folder / WEIGHTS_NAME)
    leftover = set(tensors) - {f"{p}.{n}" for p, b in blocks.items() for n in b.state_dict()}
    if leftover:
        raise ValueError(
            f"{folder / WEIGHTS_NAME} holds weights that no config entry names "
            f"({sorted(leftover)[:5]}); the folder is damaged, save it again."
        )
    return blocks, config["fingerprint"]
