"""Checkpoints of a distillation run, and resuming from the latest one.

A checkpoint is a folder ``<out>/checkpoints/step-NNNNNNN`` holding the blocks (a ConvFusion save),
``optimizer.pt`` (optimiser and learning-rate schedule) and ``training.json`` (step, settings and the
architecture fingerprint). It is written as ``step-NNNNNNN.partial`` and renamed once complete, so an
interrupted write is never taken for a checkpoint. A run resumes only with the settings it was started
with, except those in ``RESUMABLE_CHANGES``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..convfusion import ConvFusion
from ..convfusion.format import check_fingerprint
from ..ops.pyramid_conv import PyramidConvBlock
from ..training import atomic_path, setting_changes
from .config import DistillConfig

__all__ = ["CHECKPOINTS", "RESUMABLE_CHANGES", "TRAINING_NAME", "load_checkpoint", "resume_point", "write_checkpoint"]

CHECKPOINTS = "checkpoints"
TRAINING_NAME = "training.json"
PARTIAL = ".partial"  # suffix of a checkpoint folder still being written
# Settings that may change between a checkpoint and its resumption without changing the trajectory.
RESUMABLE_CHANGES = frozenset(
    {"steps", "checkpoint_every", "gradient_checkpointing", "teacher_steps", "teacher_guidance"}
)


def checkpoints(out: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a ``.partial`` one was interrupted while being written)."""
    return sorted(p for p in (out / CHECKPOINTS).glob("step-*") if not p.name.endswith(PARTIAL))


def check_resumable(saved: dict[str, Any], config: DistillConfig, fingerprint: dict[str, Any], where: Path) -> None:
    changed = setting_changes(saved["config"], config.to_dict(), RESUMABLE_CHANGES)
    if changed:
        raise ValueError(
            f"Cannot resume from {where}: it was trained with other settings ({'; '.join(map(str, changed))}). "
            "Resume with the same settings, or start a new run in another --out folder."
        )
    check_fingerprint(saved["fingerprint"], fingerprint, f"The checkpoint {where}")


def resume_point(
    out: Path, config: DistillConfig, fingerprint: dict[str, Any], resume: bool
) -> tuple[int, Path | None]:
    """(first step to run, checkpoint to load or None); refuses to mix a new run into an old folder."""
    existing = checkpoints(out)
    if not resume:
        if existing:
            raise ValueError(
                f"{out} already holds checkpoints (latest {existing[-1].name}); pass resume=True "
                "(--resume) to continue that run, or choose another output folder."
            )
        return 0, None
    if not existing:
        raise ValueError(f"Nothing to resume: {out / CHECKPOINTS} holds no checkpoint. Drop --resume to start.")
    checkpoint = existing[-1]
    saved = json.loads((checkpoint / TRAINING_NAME).read_text(encoding="utf-8"))
    check_resumable(saved, config, fingerprint, checkpoint)
    if saved["step"] >= config.steps:
        raise ValueError(
            f"{checkpoint} is already at step {saved['step']} >= steps={config.steps}; raise --steps to train further."
        )
    return int(saved["step"]), checkpoint


def write_checkpoint(
    out: Path,
    step: int,
    blocks: Mapping[str, PyramidConvBlock],
    fingerprint: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    lr_schedule: torch.optim.lr_scheduler.LRScheduler,
    config: DistillConfig,
) -> None:
    """Checkpoint after ``step`` steps into ``out``'s checkpoints, written under a temporary name, then renamed."""
    with atomic_path(out / CHECKPOINTS / f"step-{step:07d}", suffix=PARTIAL) as partial:
        ConvFusion(blocks=blocks, fingerprint=fingerprint).save(partial)
        torch.save(
            {"optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict()},
            partial / "optimizer.pt",
        )
        training = {"step": step, "config": config.to_dict(), "fingerprint": fingerprint}
        (partial / TRAINING_NAME).write_text(json.dumps(training, indent=2), encoding="utf-8")


def load_checkpoint(
    checkpoint: Path,
    blocks: Mapping[str, PyramidConvBlock],
    optimizer: torch.optim.Optimizer,
    lr_schedule: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Blocks (in place), optimiser and schedule from a checkpoint (the step comes from its training.json)."""
    loaded = ConvFusion.from_pretrained(checkpoint).blocks
    with torch.no_grad():
        for path, block in blocks.items():
            for target, source in zip(block.state_dict().values(), loaded[path].state_dict().values(), strict=True):
                target.copy_(source)
    state = torch.load(checkpoint / "optimizer.pt", map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["lr_schedule"])
