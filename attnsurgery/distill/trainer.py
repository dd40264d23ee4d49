"""The distillation trainer: one optimiser over the conv blocks of an applied student, the step, checkpoints.

Each step draws its batch, caption dropout, noise and timesteps from ``(seed, step, process)`` alone, runs
the frozen teacher and the student on the same noisy latents, records both sides' attn1 outputs for the
feature term, and takes one AdamW step on the blocks (gradient clipping, warm-up/cool-down schedule).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..convfusion import ConvFusion
from ..training import min_snr_weights, warmup_cooldown
from .config import DistillConfig
from .data import LatentFolder
from .loss import distillation_loss
from .resume import load_checkpoint, write_checkpoint

__all__ = ["Trainer", "teacher_sharing_weights"]


def _step_generator(seed: int, step: int, process: int) -> torch.Generator:
    digest = hashlib.sha256(repr(("distill", seed, step, process)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def teacher_sharing_weights(denoiser: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree whose parameters and buffers are the original tensors (no extra memory)."""
    memo = {id(tensor): tensor for tensor in itertools.chain(denoiser.parameters(), denoiser.buffers())}
    return copy.deepcopy(denoiser, memo)


def _encode_captions(pipe: Any, captions: list[str], resolution: int, device: torch.device) -> dict[str, Any]:
    """The denoiser's conditioning kwargs (SD: text states; SDXL: also pooled text and time ids)."""
    with torch.no_grad():
        encoded = pipe.encode_prompt(
            prompt=captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    conditioning: dict[str, Any] = {"encoder_hidden_states": encoded[0]}
    if pipe.unet.config.get("addition_embed_type") == "text_time":
        time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device)
        conditioning["added_cond_kwargs"] = {
            "text_embeds": encoded[2],
            "time_ids": time_ids.to(encoded[2].dtype).repeat(len(captions), 1),
        }
    return conditioning


class Trainer:
    """One distillation run on an applied student: the optimiser, the step, checkpoints."""

    def __init__(
        self,
        pipe: Any,
        teacher: torch.nn.Module,
        student: torch.nn.Module,
        surgery: Any,
        config: DistillConfig,
        accelerator: Any,
        fingerprint: dict[str, Any],
        out: Path,
    ) -> None:
        from diffusers import DDPMScheduler

        self.pipe, self.teacher, self.config, self.accelerator = pipe, teacher, config, accelerator
        self.fingerprint, self.out = fingerprint, out
        self.blocks = dict(ConvFusion.extract(student).blocks)
        self.params = [p for block in self.blocks.values() for p in block.float().parameters()]
        for param in self.params:
            param.requires_grad_(True)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.weights = config.weights()
        self.student_features: dict[str, torch.Tensor] = {}
        self.teacher_features: dict[str, torch.Tensor] = {}
        for path in self.blocks:
            surgery.add_hook(student.get_submodule(path), self._recorder(self.student_features, path), pre=False)
            teacher.get_submodule(path).register_forward_hook(self._recorder(self.teacher_features, path))
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            partial(
                warmup_cooldown,
                steps=config.steps,
                warmup_steps=config.warmup_steps,
                cooldown_steps=config.cooldown_steps,
            ),
        )
        self.student = accelerator.prepare_model(student) if accelerator.num_processes > 1 else student

    @staticmethod
    def _recorder(store: dict[str, torch.Tensor], path: str):
        def record(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            store[path] = output

        return record

    def load(self, checkpoint: Path) -> None:
        """Blocks, optimiser and schedule from a checkpoint (the step comes from its training.json)."""
        load_checkpoint(checkpoint, self.blocks, self.optimizer, self.lr_schedule)

    def run(self, dataset: LatentFolder, start: int, resolution: int) -> list[dict[str, float]]:
        """Steps ``start`` to ``config.steps`` with a progress bar, a log line per step and checkpoints."""
        config, main = self.config, self.accelerator.is_main_process
        history = []
        progress = tqdm(
            total=config.steps,
            initial=start,
            desc="distilling",
            unit="step",
            disable=not self.accelerator.is_local_main_process,
        )
        self.out.mkdir(parents=True, exist_ok=True)
        with (self.out / "log.jsonl").open("a", encoding="utf-8") if main else contextlib.nullcontext() as log:
            for step in range(start, config.steps):
                record = self.step(dataset, step, resolution)
                history.append(record)
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                progress.set_postfix(loss=f"{record['loss']:.4f}")
                progress.update()
                done = step + 1
                if done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0):
                    self.save(done)
        progress.close()
        return history

    def save(self, step: int) -> None:
        """Checkpoint after ``step`` steps (main process), written under a temporary name, then renamed."""
        if self.accelerator.is_main_process:
            write_checkpoint(
                self.out, step, self.blocks, self.fingerprint, self.optimizer, self.lr_schedule, self.config
            )
        self.accelerator.wait_for_everyone()

    def step(self, dataset: LatentFolder, step: int, resolution: int) -> dict[str, float]:
        config, accelerator = self.config, self.accelerator
        process, processes = accelerator.process_index, accelerator.num_processes
        latents, captions = dataset.batch(config.seed, step * processes + process, config.batch_size)
        generator = _step_generator(config.seed, step, process)
        dropped = torch.rand(len(captions), generator=generator) < config.caption_dropout
        captions = ["" if drop else caption for drop, caption in zip(dropped.tolist(), captions, strict=True)]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (len(captions),), generator=generator
        )
        device = accelerator.device
        latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        target = noise if prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, timesteps)
        dtype = next(self.teacher.parameters()).dtype
        conditioning = _encode_captions(self.pipe, captions, resolution, device)
        self.student_features.clear()
        self.teacher_features.clear()
        with accelerator.autocast():
            with torch.no_grad():
                teacher = self.teacher(noisy.to(dtype), timesteps, **conditioning).sample
            student = self.student(noisy.to(dtype), timesteps, **conditioning).sample
        sample_weights = None
        if self.weights.min_snr_gamma is not None:
            sample_weights = min_snr_weights(
                self.noise_scheduler.alphas_cumprod, timesteps, self.weights.min_snr_gamma, prediction_type
            )
        loss, parts = distillation_loss(
            student,
            teacher,
            target,
            self.student_features,
            self.teacher_features,
            self.weights,
            sample_weights,
        )
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(self.params, config.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"step": step + 1, "loss": loss.item(), "lr": lr, **parts}
