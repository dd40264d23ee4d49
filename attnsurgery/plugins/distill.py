"""Distil a UNet's self-attention into ConvFusion blocks: frozen teacher, trainable conv blocks.

The student is the same denoiser with every attn1 swapped for a conv block (through the surgery, so the
model is restored afterwards); the teacher is a second module tree over the *same* weight tensors, keeping
its attention, so distilling costs no second copy of the model. Only the blocks train (AdamW, warm-up,
gradient clipping), on ``accelerate`` (one process, or several under ``accelerate launch``).

Everything random in a step (batch order, caption dropout, noise, timesteps) is a pure function of
``(seed, step, process)``, so ``resume`` continues exactly where a checkpoint left off.

Example:
    >>> result = distill(pipe, "prompts.txt", "out", DistillConfig(steps=2000))   # doctest: +SKIP
    >>> handle = attnsurgery.apply(pipe, result.plugin)                            # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..convfusion import ConvFusion
from ..convfusion.format import architecture_fingerprint, check_fingerprint
from ..families import detect_family
from ..pipelines.loading import load_pipeline
from ..surgery import active_surgeries, apply, resolve_target
from ..training import atomic_path, min_snr_weights, setting_changes, warmup_cooldown
from .distill_data import (
    IMAGE_SUFFIXES,
    LatentFolder,
    cache_from_images,
    cache_from_prompts,
    find_captioned_images,
    read_prompts,
)
from .distill_loss import LOSS_PRESETS, LossWeights, distillation_loss

__all__ = ["DistillConfig", "DistillResult", "distill"]

CHECKPOINTS = "checkpoints"
TRAINING_NAME = "training.json"
PARTIAL = ".partial"  # suffix of a checkpoint folder still being written
# Settings that may change between a checkpoint and its resumption without changing the trajectory.
_RESUMABLE_CHANGES = frozenset(
    {"steps", "checkpoint_every", "gradient_checkpointing", "teacher_steps", "teacher_guidance"}
)


@dataclass(frozen=True)
class DistillConfig:
    """Settings of one distillation run (defaults: the ConvFusion paper's).

    Args:
        preset: loss weights, ``"convfusion"`` (1, 1, 0.001) or ``"linfusion"`` (1, 0.5, 0.5).
        loss_weights: (noise, teacher, feature) weights overriding the preset.
        min_snr_gamma: Min-SNR gamma of the prediction terms (paper: 5), None for plain MSE.
        steps: total optimiser steps.
        batch_size: samples per step and process.
        lr, weight_decay, betas: AdamW (paper: 3e-4, 0.03, (0.9, 0.99)).
        warmup_steps: linear learning-rate warm-up (paper: 500).
        cooldown_steps: linear learning-rate fall to 0 over the last steps (paper: none, 0).
        grad_clip: max gradient norm (paper: 1.0).
        caption_dropout: probability of training a sample on the empty prompt (keeps CFG working).
        resolution: training image side in pixels; None for the family's native one.
        checkpoint_every: steps between checkpoints (0: only the final save).
        gradient_checkpointing: recompute activations in backward (less memory, more compute).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (accelerate).
        seed: seed of data order, noise, timesteps and block init.
        kernel_size, gate: block settings (None: the family's kernel preset).
        teacher_steps, teacher_guidance: sampling settings when the teacher makes data from prompts.
    """

    preset: str = "convfusion"
    loss_weights: tuple[float, float, float] | None = None
    min_snr_gamma: float | None = 5.0
    steps: int = 1000
    batch_size: int = 4
    lr: float = 3e-4
    weight_decay: float = 0.03
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 500
    cooldown_steps: int = 0
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    resolution: int | None = None
    checkpoint_every: int = 500
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    seed: int = 0
    kernel_size: int | None = None
    gate: str = "mul"
    teacher_steps: int = 25
    teacher_guidance: float = 7.5

    def __post_init__(self) -> None:
        if self.preset not in LOSS_PRESETS:
            raise ValueError(f"preset must be one of {sorted(LOSS_PRESETS)}, got {self.preset!r}.")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("warmup_steps", "cooldown_steps", "checkpoint_every", "teacher_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.cooldown_steps > self.steps:
            raise ValueError(f"cooldown_steps must be <= steps ({self.steps}), got {self.cooldown_steps}.")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError(f"lr and grad_clip must be > 0, got lr={self.lr}, grad_clip={self.grad_clip}.")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}.")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"resolution must be a multiple of 8 pixels, got {self.resolution}.")
        self.weights()  # validates the weights

    def weights(self) -> LossWeights:
        """The loss weights this config trains with."""
        if self.loss_weights is None:
            return LossWeights.preset(self.preset, self.min_snr_gamma)
        return LossWeights(*self.loss_weights, min_snr_gamma=self.min_snr_gamma)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass(frozen=True)
class DistillResult:
    """What a run produced: the trained blocks as a plugin, the per-step losses of this run, the folder."""

    plugin: ConvFusion
    history: list[dict[str, float]]
    folder: Path


def _step_generator(seed: int, step: int, process: int) -> torch.Generator:
    digest = hashlib.sha256(repr(("distill", seed, step, process)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _teacher_sharing_weights(denoiser: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree whose parameters and buffers are the original tensors (no extra memory)."""
    memo = {id(tensor): tensor for tensor in itertools.chain(denoiser.parameters(), denoiser.buffers())}
    return copy.deepcopy(denoiser, memo)


def _latent_folder(pipe: Any, data: Path, out: Path, config: DistillConfig, resolution: int) -> LatentFolder:
    """Turn ``data`` (prompts file, captioned image folder or latent folder) into a latent folder."""
    if data.is_file():
        prompts = read_prompts(data)
        folder = cache_from_prompts(
            pipe,
            prompts,
            out / "latents",
            resolution,
            seed=config.seed,
            num_inference_steps=config.teacher_steps,
            guidance_scale=config.teacher_guidance,
        )
        return LatentFolder(folder)
    if not data.is_dir():
        raise ValueError(
            f"--data {data} does not exist; pass a prompts .txt file, an image folder or a latent folder."
        )
    if any(data.glob("*.safetensors")):
        return LatentFolder(data)
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in data.iterdir()):
        raise ValueError(
            f"The folder {data} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no latent shards "
            "(.safetensors); point --data at captioned images, latents or a prompts file."
        )
    samples = find_captioned_images(data)
    return LatentFolder(cache_from_images(pipe.vae, samples, out / "latents", resolution, seed=config.seed))


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


def _checkpoints(out: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a ``.partial`` one was interrupted while being written)."""
    return sorted(p for p in (out / CHECKPOINTS).glob("step-*") if not p.name.endswith(PARTIAL))


def _check_resumable(
    saved: dict[str, Any], config: DistillConfig, fingerprint: dict[str, Any], where: Path
) -> None:
    changed = setting_changes(saved["config"], config.to_dict(), _RESUMABLE_CHANGES)
    if changed:
        raise ValueError(
            f"Cannot resume from {where}: it was trained with other settings ({'; '.join(map(str, changed))}). "
            "Resume with the same settings, or start a new run in another --out folder."
        )
    check_fingerprint(saved["fingerprint"], fingerprint, f"The checkpoint {where}")


def _resume_point(
    out: Path, config: DistillConfig, fingerprint: dict[str, Any], resume: bool
) -> tuple[int, Path | None]:
    """(first step to run, checkpoint to load or None); refuses to mix a new run into an old folder."""
    existing = _checkpoints(out)
    if not resume:
        if existing:
            raise ValueError(
                f"{out} already holds checkpoints (latest {existing[-1].name}); pass resume=True "
                "(--resume) to continue that run, or choose another output folder."
            )
        return 0, None
    if not existing:
        raise ValueError(
            f"Nothing to resume: {out / CHECKPOINTS} holds no checkpoint. Drop --resume to start."
        )
    checkpoint = existing[-1]
    saved = json.loads((checkpoint / TRAINING_NAME).read_text(encoding="utf-8"))
    _check_resumable(saved, config, fingerprint, checkpoint)
    if saved["step"] >= config.steps:
        raise ValueError(
            f"{checkpoint} is already at step {saved['step']} >= steps={config.steps}; "
            "raise --steps to train further."
        )
    return int(saved["step"]), checkpoint


class _Trainer:
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
            surgery.add_hook(
                student.get_submodule(path), self._recorder(self.student_features, path), pre=False
            )
            teacher.get_submodule(path).register_forward_hook(self._recorder(self.teacher_features, path))
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(warmup_cooldown, steps=config.steps, warmup_steps=config.warmup_steps,
                                    cooldown_steps=config.cooldown_steps)
        )
        self.student = accelerator.prepare_model(student) if accelerator.num_processes > 1 else student

    @staticmethod
    def _recorder(store: dict[str, torch.Tensor], path: str):
        def record(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            store[path] = output

        return record

    def load(self, checkpoint: Path) -> None:
        """Blocks, optimiser and schedule from a checkpoint (the step comes from its training.json)."""
        loaded = ConvFusion.from_pretrained(checkpoint).blocks
        with torch.no_grad():
            for path, block in self.blocks.items():
                for target, source in zip(
                    block.state_dict().values(), loaded[path].state_dict().values(), strict=True
                ):
                    target.copy_(source)
        state = torch.load(checkpoint / "optimizer.pt", map_location="cpu")
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])

    def run(self, dataset: LatentFolder, start: int, resolution: int) -> list[dict[str, float]]:
        """Steps ``start`` to ``config.steps`` with a progress bar, a log line per step and checkpoints."""
        config, main = self.config, self.accelerator.is_main_process
        history = []
        progress = tqdm(total=config.steps, initial=start, desc="distilling", unit="step",
                        disable=not self.accelerator.is_local_main_process)
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
            self._write_checkpoint(self.out / CHECKPOINTS / f"step-{step:07d}", step)
        self.accelerator.wait_for_everyone()

    def _write_checkpoint(self, folder: Path, step: int) -> None:
        with atomic_path(folder, suffix=PARTIAL) as partial:
            ConvFusion(blocks=self.blocks, fingerprint=self.fingerprint).save(partial)
            torch.save(
                {"optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict()},
                partial / "optimizer.pt",
            )
            training = {"step": step, "config": self.config.to_dict(), "fingerprint": self.fingerprint}
            (partial / TRAINING_NAME).write_text(json.dumps(training, indent=2), encoding="utf-8")

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
        target = (
            noise
            if prediction_type == "epsilon"
            else self.noise_scheduler.get_velocity(latents, noise, timesteps)
        )
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


def distill(
    target: Any,
    data: str | Path,
    out: str | Path,
    config: DistillConfig = DistillConfig(),
    *,
    resume: bool = False,
) -> DistillResult:
    """Distil ``target``'s self-attention into ConvFusion blocks and save them into ``out``.

    The pipeline is moved to the accelerator's device and restored otherwise: its weights stay frozen and
    untouched, the surgery is removed at the end, gradient checkpointing and ``requires_grad`` flags are
    put back.

    Args:
        target: a diffusers SD1.x/SD2.x/SDXL pipeline (text encoders and VAE are needed for the data).
        data: a prompts file (one per line; the teacher generates and caches the latents), a folder of
            captioned images (``<name>.txt`` or ``metadata.jsonl``), or a folder of latent shards.
        out: output folder: ``convfusion.safetensors`` + ``convfusion.json``, ``checkpoints/``, the latent
            cache and ``log.jsonl``.
        config: training settings.
        resume: continue from the latest checkpoint in ``out`` (settings must match it).

    Returns:
        The trained blocks as a ``ConvFusion`` plugin (loaded from ``out``), this run's losses, ``out``.

    Example:
        >>> result = distill(pipe, "prompts.txt", "out", DistillConfig(steps=20_000))  # doctest: +SKIP
    """
    from accelerate import Accelerator

    pipe, denoiser = resolve_target(target)
    if pipe is None or not hasattr(pipe, "encode_prompt"):
        raise ValueError(
            "distill needs the whole pipeline (text encoders, VAE, scheduler), not a bare denoiser."
        )
    if active_surgeries(denoiser):
        raise ValueError(
            "Remove the surgeries applied to this pipeline before distilling (attnsurgery.remove); "
            "the teacher must be the unmodified model."
        )
    family = detect_family(denoiser, getattr(pipe, "vae_scale_factor", None))
    if family.kind != "unet" or family.inpaint:
        raise NotImplementedError(
            f"ConvFusion distillation supports SD1.x/SD2.x/SDXL text-to-image UNets, "
            f"not {family.name}{' (inpainting)' if family.inpaint else ''}."
        )
    out, data = Path(out), Path(data)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    fingerprint = architecture_fingerprint(denoiser)
    start, checkpoint = _resume_point(out, config, fingerprint, resume)
    resolution = config.resolution or family.native_resolution
    pipe.to(accelerator.device)
    with accelerator.main_process_first():  # one process builds the cache, the others then read it
        dataset = _latent_folder(pipe, data, out, config, resolution)  # before the surgery: teacher samples
    channels = denoiser.config.in_channels
    if dataset.latent_shape is not None and dataset.latent_shape[0] != channels:
        raise ValueError(
            f"The latents hold {dataset.latent_shape[0]} channels, the denoiser takes {channels}: "
            "they were made with another VAE."
        )
    teacher = _teacher_sharing_weights(denoiser)
    flags = {param: param.requires_grad for param in denoiser.parameters()}
    was_checkpointing = denoiser.is_gradient_checkpointing
    surgery = apply(pipe, ConvFusion(kernel_size=config.kernel_size, gate=config.gate, seed=config.seed))
    try:
        for param in flags:
            param.requires_grad_(False)
        if config.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        trainer = _Trainer(pipe, teacher, denoiser, surgery, config, accelerator, fingerprint, out)
        if checkpoint is not None:
            trainer.load(checkpoint)
        history = trainer.run(dataset, start, resolution)
        if accelerator.is_main_process:
            ConvFusion(blocks=trainer.blocks, fingerprint=fingerprint).save(out)
        accelerator.wait_for_everyone()
    finally:
        surgery.remove()
        if config.gradient_checkpointing and not was_checkpointing:
            denoiser.disable_gradient_checkpointing()
        for param, flag in flags.items():
            param.requires_grad_(flag)
    return DistillResult(ConvFusion.from_pretrained(out), history, out)


def distill_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``attnsurgery distill`` arguments (added to ``parser`` when one is given)."""
    parser = parser or argparse.ArgumentParser(
        prog="attnsurgery distill", description=__doc__.splitlines()[0]
    )
    defaults = DistillConfig()
    parser.add_argument(
        "--model", required=True, help="SD1.x/SD2.x/SDXL: reference, a diffusers folder, hub id or single file"
    )
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="prompts .txt file, folder of captioned images, or folder of latent shards",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--preset",
        choices=sorted(LOSS_PRESETS),
        default=defaults.preset,
        help="loss weights: convfusion (1, 1, 0.001) or linfusion (1, 0.5, 0.5)",
    )
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--cooldown-steps", type=int, default=defaults.cooldown_steps,
                        help="let the learning rate fall linearly to 0 over the last N steps")
    parser.add_argument(
        "--resolution", type=int, default=None, help="pixels; default: the model's native size"
    )
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=defaults.mixed_precision)
    parser.add_argument(
        "--min-snr-gamma",
        type=float,
        default=defaults.min_snr_gamma,
        help="Min-SNR gamma; 0 turns the weighting off",
    )
    parser.add_argument("--kernel-size", type=int, default=None, help="one kernel size for every block")
    parser.add_argument("--gate", choices=("mul", "div", "sigmoid"), default=defaults.gate)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    return parser


def distill_from_args(args: argparse.Namespace) -> int:
    """Run a distillation from parsed ``distill_parser`` arguments (shared with the main CLI)."""
    config = DistillConfig(
        preset=args.preset,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        warmup_steps=args.warmup_steps,
        cooldown_steps=args.cooldown_steps,
        resolution=args.resolution,
        checkpoint_every=args.checkpoint_every,
        gradient_checkpointing=args.gradient_checkpointing,
        mixed_precision=args.mixed_precision,
        min_snr_gamma=args.min_snr_gamma or None,
        kernel_size=args.kernel_size,
        gate=args.gate,
        seed=args.seed,
    )
    pipe = load_pipeline(args.model)
    result = distill(pipe, args.data, args.out, config, resume=args.resume)
    last = result.history[-1]["loss"] if result.history else float("nan")
    print(
        f"ConvFusion blocks saved to {result.folder} (final loss {last:.4f}); load them with "
        f"attnsurgery.ConvFusion.from_pretrained({str(result.folder)!r})"
    )
    return 0
