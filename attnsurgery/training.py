"""Training pieces the reference trainer and the ConvFusion distiller share.

- ``warmup_cooldown``: the learning-rate shape, linear warm-up, constant, then a linear cool-down to 0. The
  cool-down averages out the noise of the constant phase: on the reference model a 600-step cool-down
  raised held-out fidelity from 0.43 to 0.60 where 800 more constant steps had raised nothing.
- ``min_snr_weights``: Min-SNR loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
  Weighting") for epsilon and velocity targets on DDPM noise levels.
- ``setting_changes``: what differs between a checkpoint's settings and a resumed run's, for the error
  that refuses the resume.
- ``ema_update``: one step of an exponential moving average of the weights.
- ``atomic_path``: write a checkpoint under a temporary name and rename it into place, so an interrupted
  write never leaves a half checkpoint under the real name.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["SettingChange", "atomic_path", "ema_update", "min_snr_weights", "setting_changes", "warmup_cooldown"]


def warmup_cooldown(step: int, steps: int, warmup_steps: int, cooldown_steps: int) -> float:
    """LR factor at ``step`` (0-based) of ``steps``: ramps up over ``warmup_steps``, falls to 0 over the
    last ``cooldown_steps`` (0 disables either phase).

    Example:
        >>> [warmup_cooldown(s, 6, 2, 2) for s in range(6)]
        [0.5, 1.0, 1.0, 1.0, 1.0, 0.5]
    """
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    return factor * min(1.0, (steps - step) / cooldown_steps) if cooldown_steps else factor


def min_snr_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Per-sample Min-SNR loss weights: min(SNR, gamma) / SNR for epsilon targets, / (SNR + 1) for v.

    Args:
        alphas_cumprod: the noise scheduler's cumulative alphas, one per training timestep.
        timesteps: [B] the batch's timesteps.
        gamma: the SNR clip (5 in the paper).
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.

    Example:
        >>> min_snr_weights(torch.tensor([0.5]), torch.tensor([0]), 5.0, "v_prediction")
        tensor([0.5000])
    """
    alpha = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha / (1 - alpha)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise NotImplementedError(
        f"Min-SNR weighting for prediction_type {prediction_type!r} is not defined; pass min_snr_gamma=None."
    )


@dataclass(frozen=True)
class SettingChange:
    """One setting whose value differs between a checkpoint and the run resuming it (None: absent)."""

    name: str
    checkpoint: Any
    now: Any

    def __str__(self) -> str:
        return f"{self.name}: checkpoint {self.checkpoint!r}, now {self.now!r}"


def setting_changes(
    saved: Mapping[str, Any], current: Mapping[str, Any], resumable: Collection[str] = ()
) -> list[SettingChange]:
    """The settings, by name, whose checkpoint value differs from the current one, leaving out the
    ``resumable`` ones (those a resumed run may change without changing the steps already taken).

    Example:
        >>> [str(c) for c in setting_changes({"lr": 0.1, "steps": 5}, {"lr": 0.2, "steps": 9}, ["steps"])]
        ['lr: checkpoint 0.1, now 0.2']
    """
    return [
        SettingChange(name, saved.get(name), current.get(name))
        for name in sorted(set(saved) | set(current))
        if name not in resumable and saved.get(name) != current.get(name)
    ]


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Move every parameter of ``ema`` towards ``model``'s: ``ema = decay * ema + (1 - decay) * model``."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1.0 - decay)


@contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary sibling of ``path`` (a file or a folder) to write, renamed onto ``path`` when the block
    ends without error; a leftover from an interrupted write is removed first.

    Example:
        >>> with atomic_path(out / "checkpoint.pt") as tmp:  # doctest: +SKIP
        ...     torch.save(state, tmp)
    """
    tmp = path.with_name(path.name + suffix)
    if tmp.is_dir():
        shutil.rmtree(tmp)
    else:
        tmp.unlink(missing_ok=True)
    yield tmp
    os.replace(tmp, path)
