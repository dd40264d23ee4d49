"""Tiny LoRA files for the tiny pipelines, written offline and loaded the way users load theirs."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def write_lora(
    denoiser: torch.nn.Module, prefix: str, targets: list[str], folder: Path, rank: int = 4, seed: int = 0
) -> Path:
    """Write a random LoRA (peft key format) on the Linear / Conv2d modules at ``targets`` into ``folder``.

    Args:
        denoiser: the model the LoRA is made for (its modules give the shapes).
        prefix: the pipeline's component name in the keys (``"unet"`` or ``"transformer"``).
        targets: module paths inside ``denoiser``.
        folder: where ``pytorch_lora_weights.safetensors`` goes (created).
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for path in targets:
        module = denoiser.get_submodule(path)
        if isinstance(module, torch.nn.Conv2d):
            a_shape = (rank, module.in_channels, *module.kernel_size)
            b_shape = (module.out_channels, rank, 1, 1)
        else:
            a_shape, b_shape = (rank, module.in_features), (module.out_features, rank)
        state[f"{prefix}.{path}.lora_A.weight"] = torch.randn(a_shape, generator=generator) / rank
        state[f"{prefix}.{path}.lora_B.weight"] = torch.randn(b_shape, generator=generator) / rank
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / WEIGHT_NAME))
    return folder
